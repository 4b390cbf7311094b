"""Share of comment and docstring lines in Python source folders.

usage:
    python scripts/comment_share.py torch_ref jittor_impl        # per file, then per folder
    python scripts/comment_share.py --max 0.25 torch_ref jittor_impl   # exit 1 above the cap

A line counts when it is not blank; it is a comment line when it starts with ``#`` or lies in
a module, class or function docstring.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def count(source: str) -> tuple[int, int]:
    """``(comment_or_docstring_lines, non_blank_lines)`` of one file's source."""
    lines = source.splitlines()
    doc = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    text = [i for i, line in enumerate(lines, 1) if line.strip()]
    comments = [i for i in text if i in doc or lines[i - 1].lstrip().startswith("#")]
    return len(comments), len(text)


def folder_share(folder: Path) -> tuple[float, list[tuple[str, int, int]]]:
    """The folder's share over all its ``.py`` files, and ``(file, comment, total)`` per file."""
    rows = [(str(p), *count(p.read_text())) for p in sorted(folder.rglob("*.py"))]
    total = sum(r[2] for r in rows)
    return (sum(r[1] for r in rows) / total if total else 0.0), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--max", type=float, default=None, help="fail above this share")
    args = parser.parse_args(argv)
    worst = 0.0
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
        share, rows = folder_share(folder)
        for name, comments, total in rows:
            print(f"{comments / max(total, 1):6.1%}  {comments:5d} / {total:5d}  {name}")
        print(f"{share:6.1%}  {folder} (all files)\n")
        worst = max(worst, share)
    return 1 if args.max is not None and worst > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
