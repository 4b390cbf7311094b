"""The C++ kernel sources of the port (``jittor_impl/kernels``): snippets, operator table, README.

All but the last test read files only (no Jittor kernel is compiled).
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

from jittor_impl import kernels

ROOT = Path(__file__).resolve().parents[1]
KERNELS_PY = ROOT / "jittor_impl" / "_kernels.py"


def _snippet_references() -> set[tuple[str, str]]:
    """``(family, name)`` of every ``cpp.snippet`` / ``cpp.header`` call in ``_kernels.py``."""
    found = set()
    for node in ast.walk(ast.parse(KERNELS_PY.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("snippet", "header")):
            family, *names = [ast.literal_eval(a) for a in node.args]
            found.update((family, name) for name in names)
    return found


def test_every_snippet_used_by_the_kernels_exists_and_every_snippet_is_used() -> None:
    used = _snippet_references()
    assert len(used) > 20
    for family, name in sorted(used):
        assert kernels.snippet(family, name).strip(), (family, name)
    defined = {(family, name) for family in kernels.FAMILIES for name in kernels.snippets(family)}
    assert defined == used


def test_snippet_files_are_exactly_the_families() -> None:
    on_disk = sorted(p.stem for p in kernels.SOURCE_DIR.glob("*.cc"))
    assert on_disk == sorted(kernels.FAMILIES)


def test_snippets_keep_no_python_format_placeholders() -> None:
    for family in kernels.FAMILIES:
        for name, text in kernels.snippets(family).items():
            assert not re.search(r"\{[a-z_]+\}|\{\{|\}\}", text), (family, name)


def test_a_missing_snippet_names_its_file_and_snippet() -> None:
    with pytest.raises(KeyError, match="pooling.cc has no snippet 'no_such_kernel'"):
        kernels.snippet("pooling", "no_such_kernel")
    with pytest.raises(KeyError, match="no kernel file nowhere.cc"):
        kernels.snippet("nowhere", "bn_forward")


def test_headers_put_the_defines_first() -> None:
    header = kernels.header("normalisation", "channel_header", BN_EPS=1e-5, FLAG=True, N=3)
    assert header.startswith("#define BN_EPS (1e-05)\n#define FLAG 1\n#define N 3\n")
    assert header.endswith(kernels.snippet("normalisation", "channel_header"))


def test_every_operator_of_the_table_is_decided_by_it_and_nothing_else_decides() -> None:
    """Only ``uses_kernel`` reads ``use_cuda`` to choose; ``devices.use`` alone sets it."""
    asked, deciders, setters = set(), set(), set()
    for path in (ROOT / "jittor_impl").glob("*.py"):
        asked.update(re.findall(r'uses_kernel\("(\w+)"\)', path.read_text()))
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef):
                continue
            for n in ast.walk(func):
                if isinstance(n, ast.Attribute) and n.attr == "use_cuda":
                    (setters if isinstance(n.ctx, ast.Store) else deciders).add(f"{path.stem}.{func.name}")
    assert asked == set(kernels.OPERATORS)
    assert deciders == {"_kernels.uses_kernel"}
    assert setters == {"devices.use"}


def test_readme_is_the_rendered_table() -> None:
    readme = (kernels.SOURCE_DIR / "README.md").read_text()
    assert readme == kernels.render_readme(), "run: python -m jittor_impl.kernels"


def test_the_kernel_sources_ship_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("jittor_impl", p) for p in config["packages"]["find"]["include"])
    patterns = config["package-data"]["jittor_impl.kernels"]
    for path in [*kernels.SOURCE_DIR.glob("*.cc"), kernels.SOURCE_DIR / "README.md"]:
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), path.name


def test_uses_kernel_follows_the_table_and_the_onednn_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import jittor as jt

    import jittor_impl._kernels as ops

    if jt.flags.use_cuda:
        pytest.skip("checks the CPU column")
    monkeypatch.setattr(ops, "has_dnnl_sgemm", lambda: False)
    for name, impl in kernels.OPERATORS.items():
        assert ops.uses_kernel(name) == (impl.cpu == kernels.KERNEL and not impl.onednn), name
    monkeypatch.setattr(ops, "has_dnnl_sgemm", lambda: True)
    assert all(ops.uses_kernel(name) for name in kernels.OPERATORS)
    with pytest.raises(KeyError, match="no operator 'gelu'"):
        ops.uses_kernel("gelu")
