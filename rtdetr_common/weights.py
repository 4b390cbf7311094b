"""Framework-neutral weight files: safetensors / npz, and Jittor's pickle checkpoints read safely.

In memory, a checkpoint is a :class:`WeightSet`: the ``model`` state_dict and/or the ``ema``
state_dict with its ``updates``/``warmups`` counters, every tensor a numpy array. Both frameworks
convert to and from this form, so a conversion is a straight copy by name and can be checked bit
for bit.

Formats handled here (none of them runs code when read):

- ``.safetensors``: tensors named ``model/<key>`` and ``ema/<key>``; counters in the metadata.
- ``.npz``: the same names, plus ``__meta__`` holding the JSON metadata; read with
  ``allow_pickle=False``.
- ``.pkl`` (Jittor): what ``jittor.save`` writes, a pickled dict of numpy arrays. It is read with
  an unpickler that only admits numpy arrays, dtypes and plain containers, so a malicious file
  cannot execute code.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted write never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT_NAME = "rtdetr-parity-weights"
FORMAT_VERSION = 1
NEUTRAL_SUFFIXES = (".safetensors", ".npz")
JITTOR_SUFFIXES = (".pkl",)
TORCH_SUFFIXES = (".pth", ".pt")


@dataclass
class WeightSet:
    """Model and EMA weights as numpy arrays.

    Attributes:
        model: The trained model's state_dict, or None.
        ema: The EMA model's state_dict, or None.
        ema_updates: ``ModelEMA.updates``.
        ema_warmups: ``ModelEMA.warmups``.
        dropped: Entries of the source file that were not carried over (e.g. ``optimizer``).
    """

    model: dict[str, np.ndarray] | None = None
    ema: dict[str, np.ndarray] | None = None
    ema_updates: int = 0
    ema_warmups: int = 2000
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model is None and self.ema is None:
            raise ValueError("a WeightSet needs a model state_dict, an ema state_dict, or both")

    def preferred(self, prefer: str = "ema") -> tuple[dict[str, np.ndarray], str]:
        """The state_dict to load into a model: ``ema`` first as officially, else ``model``."""
        if prefer not in ("ema", "model"):
            raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
        other = "model" if prefer == "ema" else "ema"
        entry = prefer if getattr(self, prefer) is not None else other
        return getattr(self, entry), entry


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path`` and renames it into place.

    Args:
        path: Destination. Its folder must exist.
        write: Writes the full content to the path it is given.

    Raises:
        FileNotFoundError: If the destination folder does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder of {path} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flatten(ws: WeightSet) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors: dict[str, np.ndarray] = {}
    for entry in ("model", "ema"):
        sd = getattr(ws, entry)
        if sd is not None:
            for k, v in sd.items():
                tensors[f"{entry}/{k}"] = np.array(v, order="C")  # keeps 0-dim
    # safetensors stores tensors sorted by name: the order is kept in the metadata.
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
            "ema_updates": str(int(ws.ema_updates)), "ema_warmups": str(int(ws.ema_warmups)),
            "order": json.dumps(list(tensors))}
    return tensors, meta


def _unflatten(tensors: dict[str, np.ndarray], meta: dict[str, str], source: str) -> WeightSet:
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{source}: not an rtdetr-parity weight file (metadata format="
                         f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
    if int(meta.get("version", -1)) != FORMAT_VERSION:
        raise ValueError(f"{source}: unsupported weight file version {meta.get('version')!r}")
    order = json.loads(meta.get("order", "[]"))
    if sorted(order) != sorted(tensors):
        raise ValueError(f"{source}: tensor names do not match the recorded order (file damaged?)")
    entries: dict[str, dict[str, np.ndarray]] = {}
    for name in order:
        value = tensors[name]
        entry, sep, key = name.partition("/")
        if not sep or entry not in ("model", "ema"):
            raise ValueError(f"{source}: tensor name {name!r} is not 'model/<key>' or 'ema/<key>'")
        entries.setdefault(entry, {})[key] = value
    return WeightSet(model=entries.get("model"), ema=entries.get("ema"),
                     ema_updates=int(meta["ema_updates"]), ema_warmups=int(meta["ema_warmups"]))


def save_neutral(ws: WeightSet, path: str | Path) -> None:
    """Writes a WeightSet as ``.safetensors`` or ``.npz`` (chosen by the suffix), atomically."""
    path = Path(path)
    tensors, meta = _flatten(ws)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    elif path.suffix == ".npz":
        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                         **tensors)

        atomic_write(path, write_npz)
    else:
        raise ValueError(f"{path}: neutral weight files end in {NEUTRAL_SUFFIXES}")


def load_neutral(path: str | Path) -> WeightSet:
    """Reads a ``.safetensors`` or ``.npz`` weight file written by :func:`save_neutral`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                tensors = {k: z[k] for k in z.files if k != "__meta__"}
                if "__meta__" not in z.files:
                    raise ValueError("no __meta__ entry")
                meta = json.loads(bytes(z["__meta__"]).decode())
        else:
            raise ValueError(f"neutral weight files end in {NEUTRAL_SUFFIXES}")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as a neutral weight file: {exc}") from exc
    return _unflatten(tensors, meta, str(path))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes, scalars and plain containers; refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401  (pickle API)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def read_numpy_pickle(path: str | Path, what: str = "numpy-only pickle") -> dict:
    """Reads a pickle that may hold only numpy arrays and plain Python values (no code runs).

    Args:
        path: The file.
        what: What the file should be, named in errors.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be unpickled safely or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # any unpickling failure of a damaged or foreign file
        raise ValueError(f"{path}: cannot be read as a {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _jittor_layout(ws: WeightSet) -> dict:
    obj: dict = {}
    if ws.model is not None:
        obj["model"] = dict(ws.model)
    if ws.ema is not None:
        obj["ema"] = {"module": dict(ws.ema), "updates": int(ws.ema_updates),
                      "warmups": int(ws.ema_warmups)}
    return obj


def save_jittor_pickle(ws: WeightSet, path: str | Path) -> None:
    """Writes a Jittor checkpoint (``jittor.load`` reads it) with ``model`` and/or ``ema`` entries."""
    path = Path(path)
    if path.suffix not in JITTOR_SUFFIXES:
        raise ValueError(f"{path}: Jittor checkpoints end in {JITTOR_SUFFIXES}")
    obj = _jittor_layout(ws)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=4)

    atomic_write(path, write)


def weightset_from_mapping(obj: object, source: str, to_numpy: Callable[[object], np.ndarray],
                           is_tensor: Callable[[object], bool]) -> WeightSet:
    """Builds a WeightSet from an official-layout checkpoint dict of any framework.

    Args:
        obj: ``{'model': sd, 'ema': {'module': sd, 'updates', 'warmups'}, ...}`` or a bare state_dict.
        source: Named in errors.
        to_numpy: Converts one tensor to a numpy array (bit-exact).
        is_tensor: Tells tensors from other values.

    Raises:
        ValueError: If no state_dict is found or a state_dict holds a non-tensor value.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict checkpoint, found {type(obj).__name__}")

    def convert(sd: object, where: str) -> dict[str, np.ndarray]:
        if not isinstance(sd, dict):
            raise ValueError(f"{source}: {where} is {type(sd).__name__}, not a state_dict")
        bad = [k for k, v in sd.items() if not is_tensor(v)]
        if bad:
            raise ValueError(f"{source}: {where} has non-tensor entries {bad[:5]}")
        return {str(k): to_numpy(v) for k, v in sd.items()}

    if "model" in obj or "ema" in obj:
        ema = obj.get("ema")
        if ema is not None and not (isinstance(ema, dict) and "module" in ema):
            raise ValueError(f"{source}: 'ema' entry has no 'module' state_dict")
        return WeightSet(
            model=convert(obj["model"], "'model'") if obj.get("model") is not None else None,
            ema=convert(ema["module"], "'ema.module'") if ema is not None else None,
            ema_updates=int(ema.get("updates", 0)) if ema is not None else 0,
            ema_warmups=int(ema.get("warmups", 2000)) if ema is not None else 2000,
            dropped=sorted(str(k) for k in obj if k not in ("model", "ema")))
    if obj and all(is_tensor(v) for v in obj.values()):
        return WeightSet(model=convert(obj, "state_dict"))
    raise ValueError(f"{source}: no 'model', no 'ema' and not a bare state_dict "
                     f"(top-level keys: {sorted(map(str, obj))[:10]})")


def load_jittor_pickle(path: str | Path) -> WeightSet:
    """Reads a Jittor checkpoint safely (numpy-only unpickling)."""
    obj = read_numpy_pickle(path, "Jittor checkpoint")
    return weightset_from_mapping(obj, str(path), np.asarray,
                                  lambda v: isinstance(v, (np.ndarray, np.generic)))
