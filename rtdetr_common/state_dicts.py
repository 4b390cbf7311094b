"""Strict comparison of state_dict key sets, shapes and dtypes, shared by every loader.

Jittor's ``load_parameters`` only warns about missing keys and mismatched shapes, and a
mis-converted checkpoint that loads "mostly" is the most expensive bug a port can have. Every
loader in this project therefore compares the full specification first and refuses to load
anything unless it matches exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype name (numpy spelling, e.g. ``float32``, ``int64``) of one entry."""

    shape: tuple[int, ...]
    dtype: str


class StateDictMismatchError(ValueError):
    """A state_dict does not match the model it is loaded into.

    Attributes:
        source: Where the state_dict came from (a file path or a description).
        missing: Keys the model expects but the state_dict lacks.
        unexpected: Keys the state_dict has but the model does not.
        mismatched: ``(key, expected_spec, found_spec)`` for entries whose shape or dtype differs.
    """

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[tuple[str, TensorSpec, TensorSpec]]) -> None:
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(self._message())

    def _message(self, limit: int = 20) -> str:
        lines = [f"state_dict from {self.source} does not match the model: "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} mismatched shape/dtype"]

        def listing(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"  {title}:")
            lines.extend(f"    {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")

        listing("missing keys", self.missing)
        listing("unexpected keys", self.unexpected)
        listing("mismatched", [f"{k}: model {e.shape} {e.dtype}, file {f.shape} {f.dtype}"
                               for k, e, f in self.mismatched])
        return "\n".join(lines)


def check_state_dict(expected: Mapping[str, TensorSpec], found: Mapping[str, TensorSpec],
                     source: str) -> None:
    """Raises unless ``found`` has exactly the keys, shapes and dtypes of ``expected``.

    Args:
        expected: Specification of the model's state_dict.
        found: Specification of the state_dict about to be loaded.
        source: Named in the error (file path or description).

    Raises:
        StateDictMismatchError: Listing every missing, unexpected and mismatched entry.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [(k, expected[k], found[k]) for k in sorted(set(expected) & set(found))
                  if expected[k] != found[k]]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(source, missing, unexpected, mismatched)


def assign_param_groups(names: Iterable[str], patterns: Sequence[str]) -> list[list[str]]:
    """Splits parameter names into the official regex optimizer groups.

    The official optimizer builder keeps a name in a group when ``re.findall(pattern, name)``
    finds anything; names matched by no pattern form a last, default group.

    Args:
        names: Trainable parameter names, in model order.
        patterns: One regex per configured group.

    Returns:
        ``len(patterns) + 1`` lists of names; the last is the default group.

    Raises:
        ValueError: If a name matches more than one pattern (the optimizer would see it twice).
    """
    groups: list[list[str]] = [[] for _ in range(len(patterns) + 1)]
    compiled = [re.compile(p) for p in patterns]
    for name in names:
        hits = [i for i, rx in enumerate(compiled) if rx.findall(name)]
        if len(hits) > 1:
            raise ValueError(f"parameter {name!r} matches optimizer groups {hits} "
                             f"({[patterns[i] for i in hits]}); each parameter needs one group")
        groups[hits[0] if hits else len(patterns)].append(name)
    return groups
