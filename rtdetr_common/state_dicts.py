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


BACKBONE_PREFIX = "backbone."
COUNTER = "num_batches_tracked"
# PResNet depth by (blocks per stage, bottleneck blocks), as the official backbone builds them.
_PRESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34,
                   ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101}


def presnet_depth(keys: Iterable[str]) -> int | None:
    """The PResNet depth a backbone state_dict's keys describe (None when they describe none)."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for key in keys:
        found = re.match(r"res_layers\.(\d+)\.blocks\.(\d+)\.", key)
        if found:
            stage, block = int(found[1]), int(found[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
        bottleneck |= ".branch2c." in key
    stages = tuple(blocks.get(s, 0) for s in range(max(blocks, default=-1) + 1))
    return _PRESNET_DEPTHS.get((stages, bottleneck))


def backbone_entries(state_dict: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """The backbone's entries of a state_dict and where they came from: a bare PResNet
    state_dict (the published ImageNet checkpoints) as it is, or the ``backbone.*`` entries of a
    whole RT-DETR state_dict with the prefix removed."""
    inner = {k[len(BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    if inner:
        return inner, f"the backbone.* entries of a whole model ({len(state_dict) - len(inner)} others left)"
    return dict(state_dict), "a bare backbone state_dict"


def check_backbone(expected: Mapping[str, TensorSpec], found: Mapping[str, TensorSpec],
                   source: str) -> list[str]:
    """Checks a backbone state_dict against the model's backbone, strictly except that a
    BatchNorm's ``num_batches_tracked`` (a step counter, absent from some published files) may
    be missing.

    Returns:
        The missing counters (the model keeps its own values there).

    Raises:
        ValueError: If ``found`` describes a PResNet of another depth (both depths named).
        StateDictMismatchError: For any other missing, unexpected or mismatched entry.
    """
    want, have = presnet_depth(expected), presnet_depth(found)
    if have != want:
        what = f"PResNet-{have}" if have else "no PResNet the official code builds"
        raise ValueError(f"{source}: holds {what}; this model's backbone is PResNet-{want} "
                         f"(backbone weights must come from the same depth)")
    counters = sorted(k for k in set(expected) - set(found) if k.rsplit(".", 1)[-1] == COUNTER)
    check_state_dict({k: v for k, v in expected.items() if k not in counters}, found, source)
    return counters


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
