"""Weight conversion between an official ``.pth``, a Jittor ``.pkl`` and the neutral formats.

Every conversion reads into a :class:`~rtdetr_common.weights.WeightSet`, checks each state_dict
in it against the variant's expected keys, shapes and dtypes (strict, in every direction), and
writes atomically. Values are copied bit for bit; nothing is cast.
"""

from __future__ import annotations

from pathlib import Path

from rtdetr_common.configs import get_variant
from rtdetr_common.state_dicts import (BACKBONE_PREFIX, TensorSpec, backbone_entries,
                                      check_backbone, check_state_dict)
from rtdetr_common.weights import (JITTOR_SUFFIXES, NEUTRAL_SUFFIXES, TORCH_SUFFIXES, WeightSet,
                                   save_jittor_pickle, save_neutral)

SUFFIXES = TORCH_SUFFIXES + JITTOR_SUFFIXES + NEUTRAL_SUFFIXES


def expected_specs(variant: str, num_classes: int) -> dict[str, TensorSpec]:
    """The state_dict specification of a variant, taken from the reference model."""
    from torch_ref import build_model
    from torch_ref.checkpoint import state_dict_specs

    return state_dict_specs(build_model(get_variant(variant, num_classes)).state_dict())


def read_any(path: str | Path) -> WeightSet:
    """Reads a weight file of any supported kind, chosen by its suffix (the torch trainer's reader).

    Raises:
        ValueError: For a suffix that names no supported kind.
    """
    from torch_ref.trainer import read_weights

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown weight file suffix; use one of {SUFFIXES}")
    return read_weights(path)


def write_any(ws: WeightSet, path: str | Path) -> None:
    """Writes a WeightSet in the format its suffix names, atomically."""
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        from torch_ref.checkpoint import write_checkpoint

        write_checkpoint(ws, path)
    elif path.suffix in JITTOR_SUFFIXES:
        save_jittor_pickle(ws, path)
    elif path.suffix in NEUTRAL_SUFFIXES:
        save_neutral(ws, path)
    else:
        raise ValueError(f"{path}: unknown weight file suffix; use one of {SUFFIXES}")


def infer_num_classes(ws: WeightSet) -> int:
    """The class count of the heads (rows of ``decoder.enc_score_head.bias``)."""
    sd, _ = ws.preferred()
    key = "decoder.enc_score_head.bias"
    if key not in sd:
        raise ValueError(f"cannot infer num_classes: {key} is missing")
    return int(sd[key].shape[0])


def check_weightset(ws: WeightSet, variant: str, source: str, num_classes: int | None = None) -> None:
    """Checks every state_dict of ``ws`` strictly against the variant.

    Raises:
        StateDictMismatchError: For the first entry (``model`` or ``ema``) that does not match.
    """
    expected = expected_specs(variant, num_classes or infer_num_classes(ws))
    for entry in ("model", "ema"):
        sd = getattr(ws, entry)
        if sd is not None:
            found = {k: TensorSpec(tuple(v.shape), str(v.dtype)) for k, v in sd.items()}
            check_state_dict(expected, found, f"{source} [{entry}]")


def convert_backbone(src: str | Path, dst: str | Path, variant: str) -> WeightSet:
    """Converts backbone weights (a bare PResNet state_dict, as published, or a whole model's
    ``backbone.*`` entries) to a bare backbone file after checking them against the variant's
    backbone (:func:`rtdetr_common.state_dicts.check_backbone`).

    Raises:
        ValueError: If ``src`` and ``dst`` are the same file, or the depths differ.
        StateDictMismatchError: If the entries do not fit the backbone otherwise.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"refusing to convert {src} onto itself")
    state, _ = backbone_entries(read_any(src).preferred("model")[0])
    expected = {k[len(BACKBONE_PREFIX):]: v for k, v in expected_specs(variant, 80).items()
                if k.startswith(BACKBONE_PREFIX)}
    found = {k: TensorSpec(tuple(v.shape), str(v.dtype)) for k, v in state.items()}
    check_backbone(expected, found, str(src))
    ws = WeightSet(model=state)
    write_any(ws, dst)
    return ws


def convert(src: str | Path, dst: str | Path, variant: str, num_classes: int | None = None) -> WeightSet:
    """Converts ``src`` to ``dst`` (formats from the suffixes) after a strict check.

    Args:
        src: Existing weight file (``.pth``/``.pt``, ``.pkl``, ``.safetensors``, ``.npz``).
        dst: File to write; an existing file is replaced only once the new one is complete.
        variant: The variant the weights belong to.
        num_classes: Expected class count; inferred from the heads when None.

    Returns:
        What was converted (``dropped`` lists entries such as ``optimizer`` that were not carried).

    Raises:
        ValueError: If ``src`` and ``dst`` are the same file.
        StateDictMismatchError: If the weights do not fit the variant.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"refusing to convert {src} onto itself")
    ws = read_any(src)
    check_weightset(ws, variant, str(src), num_classes)
    write_any(ws, dst)
    return ws
