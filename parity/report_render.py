"""Renders a report folder from its ``data/`` alone: report.md, report.html, the plots and
summary.json (:func:`render`; the sections and their verdicts are :mod:`parity.report_sections`),
and the index of a folder of reports (:func:`write_index`).

Every table and figure comes from the stored measurements and the stored tolerance table, so a
report regenerated from its data is the same report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .report import REPORT_FORMAT, read_meta, read_table, write_json

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
# A section that ran but whose measurements cannot decide (a nightly with too few seeds).
INCONCLUSIVE = "inconclusive"


# --- blocks: what a section shows, rendered to Markdown and HTML ------------------------------

@dataclass
class Table:
    """A table to show: display strings, one caption."""

    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Image:
    """A plot beside the report (file name) with its alternative text."""

    file: str
    alt: str


@dataclass
class Section:
    """One section: its verdict (None for reference sections) and what it shows."""

    key: str
    title: str
    verdict: str | None = None
    compared: str = ""
    first_failure: str = ""
    thresholds: list[dict] = field(default_factory=list)
    blocks: list[Any] = field(default_factory=list)

    @property
    def detail(self) -> str:
        """What was compared, and the first failure when there is one."""
        if self.verdict == FAIL and self.first_failure:
            return f"{self.compared}; first failure: {self.first_failure}"
        return self.compared


def slug(title: str) -> str:
    """The anchor a Git forge gives a heading (lower case, punctuation dropped, spaces to -)."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def number(value: Any, digits: int = 3) -> str:
    """A cell: ``digits`` significant digits for floats, plain ints, empty for missing."""
    if value is None or (isinstance(value, str) and value == ""):
        return ""
    if isinstance(value, (bool,)) or str(value) in ("True", "False"):
        return "yes" if str(value) == "True" else "no"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15 and not isinstance(value, float):
        return str(int(x))
    return f"{x:.{digits}g}"


def count(value: Any) -> str:
    """A count cell: an integer, empty when missing."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(x) else str(int(x))


def status(passed: Any, reason: Any = "") -> str:
    """``ok`` or ``FAIL: <reason>``."""
    ok = str(passed) == "True"
    return "ok" if ok else f"FAIL: {reason}" if reason else "FAIL"


def is_true(series: pd.Series) -> pd.Series:
    return series.astype(str) == "True"


def frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """A display table (every cell a string)."""
    out = pd.DataFrame(rows)
    return out.astype(str) if not out.empty else out


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    body = table.frame.map(_md_cell) if not table.frame.empty else table.frame
    if body.empty:
        text = "(no rows)"
    else:
        body.columns = [_md_cell(c) for c in body.columns]
        text = body.to_markdown(index=False, disable_numparse=True)
    return f"{table.caption}\n\n{text}" if table.caption else text


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', escaped)


def _markdown(sections: list[Section], head: list[str]) -> str:
    lines = list(head)
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.verdict is not None:
            lines += [f"**Verdict: {s.verdict}**: {s.detail}", ""]
        for block in s.blocks:
            if isinstance(block, Table):
                lines += [to_markdown(block), ""]
            elif isinstance(block, Image):
                lines += [f"![{block.alt}]({block.file})", ""]
            elif isinstance(block, list):
                lines += [f"- {item}" for item in block] + [""]
            else:
                lines += [str(block), ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 100%; border: 1px solid #ddd; }
.pass { color: #17702a; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.notrun { color: #666; font-weight: bold; } .inconclusive { color: #a15c00; font-weight: bold; }
"""


def _verdict_html(verdict: str) -> str:
    cls = {PASS: "pass", FAIL: "fail", INCONCLUSIVE: "inconclusive"}.get(verdict, "notrun")
    return f'<span class="{cls}">{html.escape(verdict)}</span>'


def _html(sections: list[Section], head: list[str], folder: Path, title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for line in head:
        if line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            parts.append(f"<p>{_inline_html(line)}</p>")
    for s in sections:
        parts.append(f'<h2 id="{slug(s.title)}">{html.escape(s.title)}</h2>')
        if s.verdict is not None:
            parts.append(f"<p><strong>Verdict:</strong> {_verdict_html(s.verdict)}: "
                         f"{_inline_html(s.detail)}</p>")
        for block in s.blocks:
            if isinstance(block, Table):
                if block.caption:
                    parts.append(f"<p>{_inline_html(block.caption)}</p>")
                if block.frame.empty:
                    parts.append("<p>(no rows)</p>")
                else:
                    parts.append(block.frame.to_html(index=False, border=0, escape=True))
            elif isinstance(block, Image):
                data = base64.b64encode((folder / block.file).read_bytes()).decode()
                parts.append(f'<p><img src="data:image/png;base64,{data}" '
                             f'alt="{html.escape(block.alt)}"></p>')
            elif isinstance(block, list):
                parts.append("<ul>" + "".join(f"<li>{_inline_html(str(i))}</li>" for i in block)
                             + "</ul>")
            else:
                parts.append(f"<p>{_inline_html(str(block))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the tolerance table, as stored -----------------------------------------------------------

class Tolerances:
    """Lookups in the stored tolerance table (first entry of the kind whose path pattern is a
    substring of the path, ``*`` matching any), as :func:`parity.tolerances.tolerance` does."""

    def __init__(self, table: pd.DataFrame | None) -> None:
        self.table = table if table is not None else pd.DataFrame(
            columns=["kind", "path", "atol", "rtol", "max_rel_l2", "min_cosine", "why"])
        self._by_kind: dict[str, list[tuple[str, dict]]] = {}
        for row in self.table.to_dict("records"):
            pattern = "" if row["path"] == "*" else str(row["path"])
            self._by_kind.setdefault(row["kind"], []).append((pattern, row))

    def entry(self, kind: str, path: str) -> dict | None:
        return next((row for pattern, row in self._by_kind.get(kind, []) if pattern in path), None)

    def rows(self, kinds: tuple[str, ...]) -> list[dict]:
        """The table's entries of these kinds (the thresholds a section is judged against)."""
        sub = self.table[self.table["kind"].isin(kinds)]
        return [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()}
                for r in sub.to_dict("records")]

    def factor(self, kind: str, path: str) -> float | None:
        e = self.entry(kind, path)
        return None if e is None else float(e["atol"])


def rel_l2_limit(tols: Tolerances, kind: str, path: str) -> tuple[float, float] | None:
    """``(max_rel_l2, min_cosine)`` of a pure relative-L2 entry (no element-wise bound)."""
    e = tols.entry(kind, path)
    if e is None or not math.isinf(float(e["atol"])) or float(e["rtol"]) != 0.0:
        return None
    return float(e["max_rel_l2"]), float(e["min_cosine"])


# --- sections -----------------------------------------------------------------------------------

@dataclass
class Data:
    """A report's stored data."""

    folder: Path
    meta: dict
    tables: dict[str, pd.DataFrame | None]
    tols: Tolerances

    def table(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)


TABLES = ("checks", "modules", "module_runs", "parameters", "trajectory", "drift", "bench",
          "bench_times", "faults", "nightly_runs", "nightly_curves", "known_divergences",
          "framework_differences", "tolerances", "noise")


def load(folder: Path) -> Data:
    """Reads ``folder/data``."""
    data = folder / "data"
    meta = read_meta(data)
    tables = {name: read_table(data, name) for name in TABLES}
    return Data(folder, meta, tables, Tolerances(tables["tolerances"]))


def overall(sections: list[Section]) -> tuple[str, str]:
    """The report's verdict and its one line."""
    judged = [s for s in sections if s.verdict is not None]
    failed = [s for s in judged if s.verdict == FAIL]
    not_run = [s for s in judged if s.verdict == NOT_RUN]
    open_ = [s for s in judged if s.verdict == INCONCLUSIVE]
    verdict = FAIL if failed else INCONCLUSIVE if open_ else PASS
    passed = len(judged) - len(failed) - len(not_run) - len(open_)
    line = (f"{verdict.upper()}: {passed} sections pass, {len(failed)} fail, "
            + (f"{len(open_)} inconclusive, " if open_ else "") + f"{len(not_run)} not run")
    if failed:
        line += f"; first failure: {failed[0].title}: {failed[0].first_failure}"
    elif open_:
        line += f"; undecided: {open_[0].title}: {open_[0].compared}"
    return verdict, line


def render(folder: Path) -> dict:
    """Writes report.md, report.html, the plots and summary.json of ``folder`` from
    ``folder/data``; returns the summary."""
    folder = Path(folder)
    from .report_sections import REFERENCE_SECTIONS, SECTIONS

    d = load(folder)
    sections = [build(d) for build in SECTIONS]
    verdict, line = overall(sections)
    p = d.meta.get("provenance", {})
    title = f"RT-DETR {d.meta['variant']}: PyTorch to Jittor migration report"
    verdict_rows = frame([{"section": f"[{s.title}](#{slug(s.title)})", "verdict": s.verdict,
                           "compared": s.compared, "first failure": s.first_failure}
                          for s in sections])
    commit = str(p.get("git_commit", ""))[:12]
    head = [f"# {title}", "",
            f"**Verdict: {line}**", "",
            f"Variant {d.meta['variant']}, weights `{p.get('weights')}`, measured "
            f"{d.meta.get('measured_at')} at commit `{commit}`{' (dirty)' if p.get('git_dirty') else ''}. "
            "Every figure below comes from this folder's `data/` (see Provenance).", ""]
    verdict_section = Section("verdict", "Verdict", blocks=[Table(verdict_rows)])
    shown = [verdict_section, *sections, *(build(d) for build in REFERENCE_SECTIONS)]
    (folder / "report.md").write_text(_markdown(shown, head))
    html_rows = verdict_rows.copy()
    html_rows["section"] = [s.title for s in sections]
    html_shown = [Section("verdict", "Verdict", blocks=[Table(html_rows)]), *shown[1:]]
    (folder / "report.html").write_text(_html(html_shown, head, folder, title))
    summary = {
        "format": REPORT_FORMAT, "variant": d.meta["variant"], "verdict": verdict,
        "verdict_line": line, "measured_at": d.meta.get("measured_at"),
        "git_commit": p.get("git_commit"), "git_dirty": p.get("git_dirty"),
        "weights": p.get("weights"), "weights_sha256": p.get("weights_sha256"),
        "sections": [{"key": s.key, "title": s.title, "verdict": s.verdict, "compared": s.compared,
                      "first_failure": s.first_failure or None, "detail": s.detail,
                      "thresholds": s.thresholds} for s in sections],
        "reference_sections": [s.title for s in shown[len(sections) + 1:]],
        "files": sorted(f.name for f in folder.iterdir() if f.is_file()) + ["summary.json"],
    }
    write_json(folder / "summary.json", summary)
    return summary


def write_index(parent: Path) -> Path | None:
    """Writes ``parent/README.md`` (:func:`index_text`) atomically; returns its path, or None
    when ``parent`` holds no report."""
    text = index_text(parent)
    if text is None:
        return None
    out = Path(parent) / "README.md"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def index_text(parent: Path) -> str | None:
    """The index of a folder of reports: every report folder under ``parent`` with its
    verdict (from its summary.json), and the other result folders there; None without any
    report."""
    reports = []
    for sub in sorted(Path(parent).iterdir()):
        path = sub / "summary.json"
        if not sub.is_dir() or sub.name.startswith(".") or not path.is_file():
            continue
        summary = json.loads(path.read_text())
        if summary.get("format") != REPORT_FORMAT or "sections" not in summary:
            continue
        reports.append((sub.name, summary))
    if not reports:
        return None
    rows = frame([{"report": f"[{name}]({name}/report.md)", "variant": s["variant"],
                   "verdict": s["verdict_line"], "measured": s.get("measured_at", ""),
                   "commit": str(s.get("git_commit", ""))[:12]} for name, s in reports])
    # Other commands' results (a summary.json in the folder or one level down: nightly, shadow).
    others = [sub.name for sub in sorted(Path(parent).iterdir())
              if sub.is_dir() and not sub.name.startswith(".") and sub.name not in dict(reports)
              and (any(sub.glob("summary.json")) or any(sub.glob("*/summary.json")))]
    lines = ["# Reports", "",
             "Migration reports written by `rtdetr-parity report` (this index too: it is "
             "rewritten whenever a report in this folder is). Each folder holds `report.md`, a "
             "self-contained `report.html`, `summary.json` and the measurements in `data/`; "
             "`rtdetr-parity report --from <folder> --force` regenerates a report from its data.",
             "", to_markdown(Table(rows)), ""]
    if others:
        lines += ["Other result folders here (written by their own commands): "
                  + ", ".join(f"[{o}]({o}/)" for o in others) + ".", ""]
    return "\n".join(lines)
