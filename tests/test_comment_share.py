"""Comment and docstring share of the model code (``scripts/comment_share.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_SHARE = 0.25  # the model code is code first: reasons and figures live in docs/notes/

_spec = importlib.util.spec_from_file_location("comment_share", ROOT / "scripts" / "comment_share.py")
comment_share = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comment_share)


def test_counts_comments_and_docstrings_not_strings() -> None:
    source = '"""Module."""\n\n# a comment\nX = "not a docstring"\n\n\ndef f():\n    """Two\n    lines."""\n    return X  # trailing\n'
    assert comment_share.count(source) == (4, 7)


@pytest.mark.parametrize("folder", ["torch_ref", "jittor_impl"])
def test_model_code_is_mostly_code(folder: str) -> None:
    share, rows = comment_share.folder_share(ROOT / folder)
    assert rows and share < MAX_SHARE, f"{folder}: {share:.1%} comments and docstrings"


def test_the_cap_fails_a_folder_of_comments(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.py").write_text('"""Doc."""\n# note\nX = 1\n')
    assert comment_share.main(["--max", "0.25", str(tmp_path)]) == 1
    assert comment_share.main(["--max", "0.7", str(tmp_path)]) == 0
    assert "66.7%" in capsys.readouterr().out
