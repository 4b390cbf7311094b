"""Known divergences between the reference and the port: one data file, used by tests and reports.

``parity/known_divergences.json`` lists every divergence that is understood but not (yet)
removed: where it shows (variant, check, row kind, a glob of row paths), the conditions it was
measured under, why, the measured values, and how it is handled: ``"xfail"`` (the row keeps
failing and is reported; the test that meets it is marked ``xfail(strict=True)``) or the
tolerance-table entry ``{"kind": ..., "path": ...}`` that covers it. Nothing is skipped: a
report lists the entries of its variant with the rows of this run they match, measured values
included.

The file is validated on load; a malformed file raises :class:`DivergenceFileError` naming the
file, the entry and the problem.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jittor_impl._env import precise_kernels_requested
from rtdetr_common.configs import VARIANTS

from .tolerances import table_rows

DEFAULT_PATH = Path(__file__).with_name("known_divergences.json")

# The checks a divergence can belong to (parity/check.py).
CHECKS = ("eval", "train_losses", "train_step")
_REQUIRED = {"id": str, "variant": str, "check": str, "kind": str, "path": str, "reason": str,
             "measured": dict, "resolution": (str, dict)}
_OPTIONAL = {"conditions": dict}


class DivergenceFileError(ValueError):
    """The known-divergences file is missing keys, holds wrong types or contradicts the table."""


class KnownDivergence(Exception):
    """Raised by a test that met only known ``xfail`` divergences (its strict xfail expects it)."""


@dataclass(frozen=True)
class Divergence:
    """One known divergence.

    Attributes:
        id: Unique name.
        variant: Official variant name.
        check: ``eval``, ``train_losses`` or ``train_step`` (``parity.training.check_optimizer_step``).
        kind: Row kind it shows in (``loss``, ``decision``, ...).
        path: Glob (``fnmatch``) of the row paths it covers.
        reason: Why it happens.
        measured: Values measured when it was recorded.
        resolution: ``"xfail"`` or the ``{"kind", "path"}`` of the tolerance entry covering it.
        conditions: What it was measured under (``size``, ``counts``, ``weights``, ``jittor_kernels``); a
            condition the caller does not give is not checked.
    """

    id: str
    variant: str
    check: str
    kind: str
    path: str
    reason: str
    measured: dict
    resolution: Any
    conditions: dict = field(default_factory=dict)

    @property
    def xfail(self) -> bool:
        """Whether the row is expected to fail (not covered by a tolerance entry)."""
        return self.resolution == "xfail"

    def applies(self, variant: str, kind: str | None = None, path: str | None = None,
                **conditions: Any) -> bool:
        """Whether this entry covers a row of ``variant`` (and ``kind``/``path`` when given).

        Args:
            variant: Variant of the check.
            kind: Row kind, or None for any.
            path: Row path, or None for any.
            **conditions: Conditions of the run (``size``, ``counts``, ``weights``, ``check``);
                each one the entry also names must be equal (sequences compared as lists).
        """
        if variant != self.variant or (kind is not None and kind != self.kind):
            return False
        if path is not None and not fnmatch.fnmatchcase(path, self.path):
            return False
        known = {"check": self.check, **self.conditions}
        for name, value in conditions.items():
            if name in known and _plain(value) != _plain(known[name]):
                return False
        return True

    def as_dict(self) -> dict:
        """The entry as in the file, for JSON reports."""
        return {"id": self.id, "variant": self.variant, "check": self.check, "kind": self.kind,
                "path": self.path, "conditions": self.conditions, "reason": self.reason,
                "measured": self.measured, "resolution": self.resolution}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _validate(entry: Any, index: int, source: Path, tolerance_keys: set) -> Divergence:
    """Checks one raw entry and builds its :class:`Divergence`."""
    where = f"{source}: divergences[{index}]"
    if not isinstance(entry, dict):
        raise DivergenceFileError(f"{where} must be an object, got {type(entry).__name__}")
    where += f" ({entry.get('id', 'no id')})"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise DivergenceFileError(f"{where} lacks {missing}")
    unknown = [k for k in entry if k not in _REQUIRED and k not in _OPTIONAL]
    if unknown:
        raise DivergenceFileError(f"{where} has unknown keys {unknown}; allowed: "
                                  f"{sorted(_REQUIRED) + sorted(_OPTIONAL)}")
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        if key in entry and not isinstance(entry[key], types):
            raise DivergenceFileError(f"{where}: {key!r} has type {type(entry[key]).__name__}")
    if entry["variant"] not in VARIANTS:
        raise DivergenceFileError(f"{where}: unknown variant {entry['variant']!r}; "
                                  f"known: {list(VARIANTS)}")
    if entry["check"] not in CHECKS:
        raise DivergenceFileError(f"{where}: unknown check {entry['check']!r}; known: {list(CHECKS)}")
    kinds = {k for k, _ in tolerance_keys}
    if entry["kind"] not in kinds:
        raise DivergenceFileError(f"{where}: kind {entry['kind']!r} is no kind of the tolerance "
                                  f"table ({sorted(kinds)})")
    if not entry["reason"].strip() or not entry["measured"]:
        raise DivergenceFileError(f"{where}: 'reason' and 'measured' must not be empty")
    resolution = entry["resolution"]
    if isinstance(resolution, str) and resolution != "xfail":
        raise DivergenceFileError(f"{where}: resolution must be 'xfail' or a tolerance entry "
                                  f"{{'kind', 'path'}}, got {resolution!r}")
    if isinstance(resolution, dict):
        key = (resolution.get("kind"), resolution.get("path"))
        if set(resolution) != {"kind", "path"} or key not in tolerance_keys:
            raise DivergenceFileError(f"{where}: resolution {resolution} names no entry of the "
                                      "tolerance table (parity/tolerances.py)")
    return Divergence(entry["id"], entry["variant"], entry["check"], entry["kind"], entry["path"],
                      entry["reason"], entry["measured"], resolution, entry.get("conditions", {}))


def load_known_divergences(path: str | Path = DEFAULT_PATH) -> list[Divergence]:
    """Loads and validates the known-divergences file.

    Args:
        path: The JSON file (default: ``parity/known_divergences.json``).

    Returns:
        The entries, in file order.

    Raises:
        FileNotFoundError: When the file does not exist.
        DivergenceFileError: On invalid JSON, a wrong layout, a bad entry or a repeated id.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"known-divergences file {source} does not exist")
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise DivergenceFileError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("divergences"), list):
        raise DivergenceFileError(f"{source} must be an object with a 'divergences' list")
    tolerance_keys = {(r["kind"], "" if r["path"] == "*" else r["path"]) for r in table_rows()}
    entries = [_validate(e, i, source, tolerance_keys) for i, e in enumerate(data["divergences"])]
    ids = [e.id for e in entries]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DivergenceFileError(f"{source}: ids {repeated} appear more than once")
    return entries


def matching(variant: str, kind: str | None = None, path: str | None = None,
             entries: list[Divergence] | None = None, **conditions: Any) -> list[Divergence]:
    """The known divergences covering a row (or all of a variant without ``kind``/``path``).

    Args:
        variant: Variant of the check.
        kind: Row kind, or None for any.
        path: Row path, or None for any.
        entries: Entries to search (default: the loaded file).
        **conditions: Run conditions (``check``, ``size``, ``counts``, ``weights``,
            ``jittor_kernels``).

    Returns:
        The matching entries, in file order.
    """
    entries = load_known_divergences() if entries is None else entries
    return [e for e in entries if e.applies(variant, kind, path, **conditions)]


def xfail_reason(variant: str, check: str, entries: list[Divergence] | None = None,
                 **conditions: Any) -> str | None:
    """The strict-xfail reason of a test, from the ``xfail`` entries that apply to it.

    Returns:
        ``"known divergence <id>: <reason>"`` joined over the entries, or None when none applies.
    """
    found = [e for e in matching(variant, entries=entries, check=check, **conditions) if e.xfail]
    if not found:
        return None
    return "; ".join(f"known divergence {e.id}: {e.reason}" for e in found)


def jittor_kernels() -> str:
    """The Jittor kernel build of this process: ``-O3`` (``RTDETR_JITTOR_PRECISE=1``) or ``-Ofast``."""
    return "-O3" if precise_kernels_requested() else "-Ofast"


def _row_conditions(result: Any) -> dict:
    """The conditions a result carries itself (its size may be the eval size: not used)."""
    return {"weights": result.weights, "jittor_kernels": jittor_kernels()}


def report_entries(result: Any, entries: list[Divergence] | None = None) -> list[dict]:
    """Every known divergence of the result's variant, with the rows of this run it covers.

    Args:
        result: A :class:`~parity.check.CheckResult`.
        entries: Entries to use (default: the loaded file).

    Returns:
        One dict per entry (as in the file) plus ``rows``: path, passed, max abs, max rel and
        reason of each row it covers in this run (empty when the run had no such row).
    """
    entries = load_known_divergences() if entries is None else entries
    report = []
    for e in matching(result.variant, entries=entries, weights=result.weights):
        rows = [{"kind": r.kind, "path": r.comparison.path, "passed": r.comparison.passed,
                 "max_abs": r.comparison.max_abs, "max_rel": r.comparison.max_rel,
                 "reason": r.comparison.reason}
                for r in result.rows if e.applies(result.variant, r.kind, r.comparison.path,
                                                  **_row_conditions(result))]
        report.append({**e.as_dict(), "rows": rows})
    return report


def format_report(result: Any, entries: list[Divergence] | None = None) -> str:
    """Text for under the check table: each known divergence of the variant and this run's rows."""
    lines = []
    for item in report_entries(result, entries):
        handled = ("xfail" if item["resolution"] == "xfail"
                   else f"tolerance {item['resolution']['kind']}/{item['resolution']['path']}")
        conditions = ", ".join(f"{k}={v}" for k, v in item["conditions"].items())
        lines.append(f"known divergence {item['id']} ({item['kind']} {item['path']}; {handled}; "
                     f"measured at {conditions or 'any'}): {item['reason']}")
        for row in item["rows"]:
            status = "ok" if row["passed"] else f"FAIL: {row['reason']}"
            lines.append(f"    this run: {row['path']} max abs {row['max_abs']:.3g} "
                         f"max rel {row['max_rel']:.3g} {status}")
        if not item["rows"]:
            lines.append("    this run: no row of this kind and path")
    return "\n".join(lines)


def unexpected_failures(result: Any, entries: list[Divergence] | None = None,
                        **conditions: Any) -> tuple[list[str], list[str]]:
    """Splits the failing rows of a result into unexpected ones and known ``xfail`` ones.

    Args:
        result: A :class:`~parity.check.CheckResult`.
        entries: Entries to use (default: the loaded file).
        **conditions: Further run conditions (``check``, ``size``, ``counts``) besides the
            result's weights.

    Returns:
        ``(unexpected, known)``: ``"<kind> <path>: <reason>"`` lines; a known line names the
        divergence id.
    """
    entries = load_known_divergences() if entries is None else entries
    conditions = {**_row_conditions(result), **conditions}
    unexpected, known = [], []
    for r in result.rows:
        if r.passed:
            continue
        line = f"{r.kind} {r.comparison.path}: {r.comparison.reason}"
        covering = [e for e in entries if e.xfail
                    and e.applies(result.variant, r.kind, r.comparison.path, **conditions)]
        if covering:
            known.append(f"{line} (known divergence {', '.join(e.id for e in covering)})")
        else:
            unexpected.append(line)
    return unexpected, known
