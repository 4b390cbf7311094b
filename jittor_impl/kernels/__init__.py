"""Loader of the CPU kernels' C++ snippets (``<family>.cc`` here, each snippet from a
``// @snippet NAME`` line to the next), and the operator table of ``operators.py``."""

import functools
import re
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Union

from .operators import KERNEL, OPERATORS, OPS, Impl, render_readme

__all__ = ["KERNEL", "OPS", "Impl", "OPERATORS", "render_readme", "snippets", "snippet",
           "defines", "header", "FAMILIES"]

SOURCE_DIR = Path(__file__).resolve().parent
FAMILIES = ("activation", "deformable_attention", "normalisation", "optimizer", "pooling",
            "products")
_MARKER = re.compile(r"^// @snippet (\w+)[ \t]*$", re.MULTILINE)


@functools.cache
def snippets(family: str) -> Mapping[str, str]:
    """Every snippet of ``<family>.cc`` by name, in file order (the file is read once)."""
    path = SOURCE_DIR / f"{family}.cc"
    if family not in FAMILIES or not path.is_file():
        raise KeyError(f"no kernel file {path.name} in {SOURCE_DIR} (families: {FAMILIES})")
    parts = _MARKER.split(path.read_text())  # [preamble, name, body, name, body, ...]
    found = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in found:
            raise ValueError(f"{path.name}: snippet {name!r} occurs twice")
        found[name] = body.strip("\n") + "\n"
    return MappingProxyType(found)


def snippet(family: str, name: str) -> str:
    """The text of snippet ``name`` of ``<family>.cc`` (a ``KeyError`` naming both if absent)."""
    found = snippets(family)
    if name not in found:
        raise KeyError(f"{family}.cc has no snippet {name!r}; it has {sorted(found)}")
    return found[name]


def defines(**values: Union[bool, int, float, str]) -> str:
    """``#define NAME VALUE`` lines in keyword order: a bool as 0/1, a float as ``(repr)``."""
    def text(value):
        if isinstance(value, bool):
            return str(int(value))
        return f"({value!r})" if isinstance(value, float) else str(value)
    return "".join(f"#define {name} {text(value)}\n" for name, value in values.items())


def header(family: str, *names: str, **values: Union[bool, int, float, str]) -> str:
    """A ``cpu_header``: :func:`defines` of ``values``, then the named snippets of ``family``."""
    return defines(**values) + "".join(snippet(family, name) for name in names)
