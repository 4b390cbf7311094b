"""Any Jittor port of RT-DETR as the model under test: loading it, its weights, its modules.

A port is named ``MODULE:FACTORY`` (``--port``). The factory is called as
``FACTORY(variant, num_classes[, size=(h, w)][, seed=S][, config=C])`` (the keywords only when
its signature takes them; ``config`` is the reference's neutral ``VariantConfig``) and returns either the Jittor model or a dict:

- ``model`` (required): the ``jittor.Module`` whose ``model(images)`` returns the official
  output dict (``pred_logits``, ``pred_boxes``...);
- ``criterion`` (optional): ``criterion(outputs, targets) -> {term: loss}``;
- ``postprocessor`` (optional): ``postprocessor(outputs, orig_sizes) -> [{labels, boxes,
  scores}]``;
- ``options`` (optional): the port's output conventions (:class:`OutputOptions`).

``jittor_impl`` is the default port (:data:`DEFAULT_PORT`). Weights go in by state-dict name:
a port whose names differ from the official layout is described by :class:`KeyFindings`
(missing, unexpected and mis-shaped keys, the parameter count, a suggested key map by shape and
order) and loaded through a key map (``--key-map``: a JSON object, official name -> port name).
Modules are paired with the reference's (:func:`pair_modules`) by name, through the key map, or
by call order and output shapes, and each pair records how it was made.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jittor as jt
import numpy as np

DEFAULT_PORT = "jittor_impl:build_port"
BOX_FORMATS = ("cxcywh", "xyxy")
SIZE_ORDERS = ("wh", "hw")
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "aux_outputs", "dn_aux_outputs", "enc_aux_outputs",
               "dn_meta")
_PORT_PARTS = ("model", "criterion", "postprocessor", "options")


class PortError(ValueError):
    """A port cannot be loaded, built or used as named; the message says which and why."""


@dataclass(frozen=True)
class OutputOptions:
    """A port's output conventions, adapted to the official ones before any comparison.

    Attributes:
        output_keys: Official output key -> the port's key for it (only those that differ).
        box_format: The port's ``pred_boxes`` format: normalised ``cxcywh`` (official) or ``xyxy``.
        orig_size_order: The order of the postprocessor's original sizes: ``wh`` (official) or ``hw``.
    """

    output_keys: Mapping[str, str] = field(default_factory=dict)
    box_format: str = "cxcywh"
    orig_size_order: str = "wh"

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise PortError(f"port option box_format must be one of {BOX_FORMATS}, got "
                            f"{self.box_format!r}")
        if self.orig_size_order not in SIZE_ORDERS:
            raise PortError(f"port option orig_size_order must be one of {SIZE_ORDERS}, got "
                            f"{self.orig_size_order!r}")
        unknown = sorted(set(self.output_keys) - set(OUTPUT_KEYS))
        if unknown:
            raise PortError(f"port option output_keys names unknown official keys {unknown}; "
                            f"official keys are {list(OUTPUT_KEYS)}")

    def outputs(self, out: Any) -> Any:
        """The port's output dict in the official convention (keys, box format)."""
        if not isinstance(out, dict):
            raise PortError(f"the port's model returned {type(out).__name__}, not a dict of "
                            "outputs (declare its keys with the output_keys option)")
        renamed = {official: out[theirs] for official, theirs in self.output_keys.items()
                   if theirs in out}
        taken = set(self.output_keys.values())
        renamed.update({k: v for k, v in out.items() if k not in taken and k not in renamed})
        if self.box_format == "xyxy":
            renamed = _boxes_to_cxcywh(renamed)
        for nested in ("aux_outputs", "dn_aux_outputs", "enc_aux_outputs"):
            if nested in renamed:
                renamed[nested] = [self.outputs(o) for o in renamed[nested]]
        return renamed

    def to_port(self, out: dict) -> dict:
        """Official-convention outputs in the port's convention (for its criterion and
        postprocessor): the inverse of :meth:`outputs`."""
        if self.box_format == "xyxy" and out.get("pred_boxes") is not None:
            cx, cy, w, h = (out["pred_boxes"][..., i] for i in range(4))
            out = {**out, "pred_boxes": jt.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)}
        for nested in ("aux_outputs", "dn_aux_outputs", "enc_aux_outputs"):
            if nested in out:
                out = {**out, nested: [self.to_port(o) for o in out[nested]]}
        return {self.output_keys.get(k, k): v for k, v in out.items()}

    def orig_sizes(self, sizes_wh: np.ndarray) -> np.ndarray:
        """Original sizes ``[n, 2]`` given as ``(w, h)``, in the port's order."""
        return sizes_wh if self.orig_size_order == "wh" else sizes_wh[:, ::-1].copy()


def _boxes_to_cxcywh(out: dict) -> dict:
    boxes = out.get("pred_boxes")
    if boxes is None:
        return out
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return {**out, "pred_boxes": jt.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)}


@dataclass
class PortParts:
    """What a port's factory built for one variant.

    Attributes:
        model: The Jittor model.
        criterion: The loss, or None (the loss comparison is then not run).
        postprocessor: The postprocessor, or None (detections are then not compared).
        options: Its output conventions.
    """

    model: Any
    criterion: Any = None
    postprocessor: Any = None
    options: OutputOptions = field(default_factory=OutputOptions)


@dataclass
class Port:
    """A Jittor port named on the command line, ready to build.

    Attributes:
        spec: ``MODULE:FACTORY`` as given.
        factory: The factory.
        path: The folder put first on ``sys.path`` to import it, or None.
        key_map: Official state-dict name -> the port's, for the names that differ.
        key_map_source: The key-map file, or None.
    """

    spec: str
    factory: Callable[..., Any]
    path: str | None = None
    key_map: dict[str, str] = field(default_factory=dict)
    key_map_source: str | None = None

    @property
    def is_default(self) -> bool:
        """Whether this is the project's own port, :mod:`jittor_impl`."""
        return self.spec == DEFAULT_PORT

    def build(self, variant: str, num_classes: int, size: tuple[int, int] | None = None,
              seed: int = 0, config: Any = None) -> PortParts:
        """Calls the factory and checks what it returned.

        ``size``, ``seed`` and ``config`` (the reference's
        :class:`~rtdetr_common.configs.VariantConfig`) go to the factory as keywords where its
        signature takes them.

        Raises:
            PortError: If the factory raises or returns something that is not a Jittor model
                (or a dict holding one under ``model``).
        """
        try:
            accepted = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        kwargs = {k: v for k, v in (("size", size), ("seed", seed), ("config", config))
                  if k in accepted}
        try:
            built = self.factory(variant, num_classes, **kwargs)
        except Exception as exc:
            raise PortError(f"port factory {self.spec} raised {type(exc).__name__} for variant "
                            f"{variant}, {num_classes} classes: {exc}") from exc
        if isinstance(built, jt.Module):
            return PortParts(built)
        if not isinstance(built, dict) or not isinstance(built.get("model"), jt.Module):
            raise PortError(f"port factory {self.spec} returned {type(built).__name__}; it must "
                            "return a jittor.Module or a dict with a jittor.Module under 'model'")
        unknown = sorted(set(built) - set(_PORT_PARTS))
        if unknown:
            raise PortError(f"port factory {self.spec} returned unknown part(s) {unknown}; "
                            f"known parts are {list(_PORT_PARTS)}")
        options = built.get("options") or {}
        if isinstance(options, dict):
            try:
                options = OutputOptions(**options)
            except TypeError as exc:
                raise PortError(f"port {self.spec}: bad options: {exc}") from exc
        return PortParts(built["model"], built.get("criterion"), built.get("postprocessor"),
                         options)

    def identity(self) -> dict[str, Any]:
        """Module path, factory, source file, git commit (and dirty flag) of a checkout."""
        module_name, factory_name = self.spec.split(":", 1)
        module = sys.modules.get(module_name)
        source = getattr(module, "__file__", None)
        ident: dict[str, Any] = {"spec": self.spec, "module": module_name,
                                 "factory": factory_name, "file": source, "path": self.path,
                                 "key_map": self.key_map_source, "renamed_keys": len(self.key_map)}
        if source is not None:
            ident.update(_git_identity(Path(source).parent))
        return ident


def _git_identity(folder: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--", "."))}


def load_port(spec: str | None = None, path: str | Path | None = None,
              key_map: str | Path | None = None) -> Port:
    """Imports the factory of ``MODULE:FACTORY`` (default :data:`DEFAULT_PORT`).

    Args:
        spec: ``MODULE:FACTORY``.
        path: A folder to import the module from (put first on ``sys.path``).
        key_map: A key-map file (:func:`read_key_map`).

    Raises:
        PortError: For a malformed spec, a missing folder, a module that does not import, a
            factory that is missing or not callable, or a bad key-map file.
    """
    spec = spec or DEFAULT_PORT
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise PortError(f"--port expects MODULE:FACTORY (e.g. my_port.build:make_model), got {spec!r}")
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise PortError(f"--port-path {str(path)!r} is not a folder")
        if str(folder.resolve()) not in sys.path:
            sys.path.insert(0, str(folder.resolve()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        where = f" from {path}" if path is not None else ""
        raise PortError(f"cannot import port module {module_name!r}{where}: "
                        f"{type(exc).__name__}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise PortError(f"port module {module_name!r} has no callable {factory_name!r}")
    mapping = read_key_map(key_map) if key_map is not None else {}
    return Port(spec, factory, None if path is None else str(path), mapping,
                None if key_map is None else str(key_map))


def read_key_map(path: str | Path) -> dict[str, str]:
    """A key-map file: a JSON object of official state-dict names to the port's.

    Raises:
        PortError: If the file is missing, not JSON, not an object of strings, or maps two
            official names to one port name.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise PortError(f"key map {str(path)!r} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise PortError(f"key map {str(path)!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise PortError(f"key map {str(path)!r} must be a JSON object of official name -> port "
                        "name strings")
    seen: dict[str, str] = {}
    for official, theirs in data.items():
        if theirs in seen:
            raise PortError(f"key map {str(path)!r} maps both {seen[theirs]!r} and {official!r} "
                            f"to {theirs!r}")
        seen[theirs] = official
    return dict(data)


def write_key_map(mapping: Mapping[str, str], path: str | Path) -> Path:
    """Writes a key map as JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(mapping), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


Specs = Mapping[str, tuple[int, ...]]


@dataclass
class KeyFindings:
    """How a port's state dict departs from the official layout (after the key map).

    Attributes:
        missing: Official names with no port tensor.
        unexpected: Port names that no official name maps to.
        misshaped: ``(official, port, official shape, port shape)`` of names present on both
            sides with other shapes.
        official_parameters: The official parameter count (buffers excluded).
        port_parameters: The port's (its state dict less the official buffers and, for its own
            names, running statistics).
        suggested: A key map for the missing and unexpected names, aligned by state-dict order
            and shape (to review, save and pass with ``--key-map``).
        loaded: Official names whose tensors were loaded into the port.
    """

    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, str, tuple, tuple]]
    official_parameters: int
    port_parameters: int
    suggested: dict[str, str]
    loaded: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every official tensor has its place in the port, and nothing else is there."""
        return (not self.missing and not self.unexpected and not self.misshaped
                and self.official_parameters == self.port_parameters)

    def format(self, limit: int = 10) -> str:
        """The finding, for the screen: counts, the first names of each list, the count check."""
        if self.complete:
            return (f"weights: all {len(self.loaded)} official tensors loaded by name; "
                    f"{self.port_parameters:,} parameters, as officially")
        lines = [f"weights: the port's state dict departs from the official layout "
                 f"({len(self.loaded)} tensors loaded)"]
        for label, names in (("missing (official, not in the port)", self.missing),
                             ("unexpected (in the port only)", self.unexpected)):
            if names:
                lines.append(f"  {len(names)} {label}: {', '.join(names[:limit])}"
                             + (" ..." if len(names) > limit else ""))
        for official, theirs, a, b in self.misshaped[:limit]:
            lines.append(f"  mis-shaped: {official} {list(a)} vs port {theirs} {list(b)}")
        verdict = "equal" if self.official_parameters == self.port_parameters else "DIFFERENT"
        lines.append(f"  parameters: port {self.port_parameters:,}, official "
                     f"{self.official_parameters:,} ({verdict})")
        if self.suggested:
            lines.append(f"  suggested key map: {len(self.suggested)} names paired by order and "
                         "shape (review it, then pass it with --key-map)")
        return "\n".join(lines)


def _same_shape(a: tuple, b: tuple) -> bool:
    """Equal shapes; a scalar equals a one-element vector (torch ``[]``, Jittor ``[1]``)."""
    a, b = tuple(a), tuple(b)
    return a == b or (int(np.prod(a)) == 1 and int(np.prod(b)) == 1 and len(a) <= 1 and len(b) <= 1)


def official_parameters(torch_model: Any, port_model: Any,
                        key_map: Mapping[str, str]) -> list[tuple[str, jt.Var]]:
    """Another port's parameters under the official names (through ``key_map``): its state
    dict less the official buffers and, among its own names, running statistics."""
    official = {key_map.get(k, k): k for k in torch_model.state_dict()}
    buffers = {k for k, _ in torch_model.named_buffers()}
    return [(official.get(key, key), var) for key, var in port_model.state_dict().items()
            if official.get(key, key) not in buffers and not is_statistic(key)]


def is_statistic(name: str) -> bool:
    """Whether a state-dict name is a BatchNorm running statistic."""
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def key_findings(official: Specs, port: Specs, key_map: Mapping[str, str],
                 official_buffers: set[str]) -> KeyFindings:
    """Compares the port's state-dict names and shapes with the official ones.

    Args:
        official: Official name -> shape, in state-dict order.
        port: The port's name -> shape, in its state-dict order.
        key_map: Official name -> port name, for names that differ.
        official_buffers: The official names that are buffers (not parameters).
    """
    mapped = {k: key_map.get(k, k) for k in official}
    missing = [k for k, p in mapped.items() if p not in port]
    targets = set(mapped.values())
    unexpected = [p for p in port if p not in targets]
    misshaped = [(k, p, tuple(official[k]), tuple(port[p])) for k, p in mapped.items()
                 if p in port and not _same_shape(official[k], port[p])]
    buffers_in_port = {mapped[k] for k in official_buffers} | {p for p in unexpected
                                                               if is_statistic(p)}
    return KeyFindings(
        missing, unexpected, misshaped,
        official_parameters=sum(int(np.prod(s)) for k, s in official.items()
                                if k not in official_buffers),
        port_parameters=sum(int(np.prod(s)) for p, s in port.items() if p not in buffers_in_port),
        suggested=suggest_key_map({k: official[k] for k in missing},
                                  {p: port[p] for p in unexpected}))


def suggest_key_map(official: Specs, port: Specs) -> dict[str, str]:
    """Pairs official names with port names by the module tree, state-dict order and shapes.

    First down the module trees (read from the dotted names): each official module is paired
    with the first unpaired port module below its partner holding the same multiset of tensor
    shapes (a port may add or drop nesting levels and order its modules otherwise), its own
    tensors with the partner's by order and shape. What that leaves is aligned by
    :func:`align_by_order`. What a port that renamed modules but kept their contents needs.
    """
    pairs: dict[str, str] = {}
    off_tree, port_tree = _NameTree(official), _NameTree(port)
    used: set[str] = set()

    def visit(node: str, partner: str) -> None:
        own = [k for k in off_tree.children(node) if k in official]
        theirs = [k for k in port_tree.below(partner) if k in port and k not in used
                  and port_tree.parent(k) == partner]
        for a, b in align_by_order({k: official[k] for k in own}, {k: port[k] for k in theirs}).items():
            pairs[a] = b
            used.add(b)
        for child in off_tree.children(node):
            if child in official:
                continue
            target = off_tree.fingerprint(child)
            match = next((c for c in port_tree.below(partner) if c not in port
                          and port_tree.fingerprint(c) == target
                          and not any(k in used for k in port_tree.keys(c))), None)
            if match is not None:
                visit(child, match)

    visit("", "")
    rest_a = {k: official[k] for k in official if k not in pairs}
    rest_b = {k: port[k] for k in port if k not in used}
    pairs.update(align_by_order(rest_a, rest_b))
    return {k: pairs[k] for k in official if k in pairs}


class _NameTree:
    """The module tree implied by a state dict's dotted names."""

    def __init__(self, specs: Specs) -> None:
        self.specs = specs
        self._keys: dict[str, list[str]] = {"": []}
        self._children: dict[str, list[str]] = {"": []}
        self._order: list[str] = []
        for key in specs:
            parts = key.split(".")
            for cut in range(1, len(parts) + 1):
                name = ".".join(parts[:cut])
                parent = ".".join(parts[:cut - 1])
                if name not in self._children:
                    self._children[name] = []
                    self._keys[name] = []
                    self._children[parent].append(name)
                    self._order.append(name)
            for cut in range(0, len(parts)):
                self._keys[".".join(parts[:cut])].append(key)
            self._keys[key] = [key]
        self._fp: dict[str, tuple] = {}

    def children(self, name: str) -> list[str]:
        return self._children.get(name, [])

    def parent(self, name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def keys(self, name: str) -> list[str]:
        return self._keys.get(name, [])

    def below(self, name: str) -> list[str]:
        """Every node under ``name`` (modules and tensors), parents first, in order."""
        prefix = f"{name}." if name else ""
        return [n for n in self._order if n.startswith(prefix)]

    def fingerprint(self, name: str) -> tuple:
        if name not in self._fp:
            self._fp[name] = tuple(sorted(_norm(self.specs[k]) for k in self.keys(name)))
        return self._fp[name]


def _norm(shape: Any) -> tuple:
    shape = tuple(shape)
    return (1,) if int(np.prod(shape)) == 1 and len(shape) <= 1 else shape


def align_by_order(official: Mapping[str, Any], port: Mapping[str, Any],
                   same: Callable[[Any, Any], bool] | None = None) -> dict[str, str]:
    """The longest order-preserving pairing of two sequences whose paired items are the same
    (``same``; default equal shapes, a scalar equal to a one-element vector), ties broken
    towards equal last name components."""
    same = same or _same_shape
    a, b = list(official), list(port)
    n, m = len(a), len(b)
    if not n or not m:
        return {}
    shape_a = [tuple(official[k]) for k in a]
    shape_b = [tuple(port[k]) for k in b]
    leaf_a = [k.rsplit(".", 1)[-1] for k in a]
    leaf_b = [k.rsplit(".", 1)[-1] for k in b]
    score = np.zeros((n + 1, m + 1))
    for i in range(n - 1, -1, -1):
        row, below = score[i], score[i + 1]
        for j in range(m - 1, -1, -1):
            best = max(below[j], row[j + 1])
            if same(shape_a[i], shape_b[j]):
                best = max(best, below[j + 1] + 1.0 + (1e-3 if leaf_a[i] == leaf_b[j] else 0.0))
            row[j] = best
    pairs, i, j = {}, 0, 0
    while i < n and j < m:
        gain = 1.0 + (1e-3 if leaf_a[i] == leaf_b[j] else 0.0)
        if same(shape_a[i], shape_b[j]) and np.isclose(score[i, j], score[i + 1, j + 1] + gain):
            pairs[a[i]] = b[j]
            i, j = i + 1, j + 1
        elif np.isclose(score[i, j], score[i + 1, j]):
            i += 1
        else:
            j += 1
    return pairs


def load_port_weights(model: Any, state_dict: Mapping[str, np.ndarray],
                      key_map: Mapping[str, str]) -> list[str]:
    """Loads every official tensor that has a same-shaped place in the port; returns their names."""
    own = model.state_dict()
    loaded, touched = [], []
    for key, value in state_dict.items():
        var = own.get(key_map.get(key, key))
        value = np.asarray(value)
        if var is None or not _same_shape(var.shape, value.shape):
            continue
        var.update(jt.array(value.reshape(var.shape)).cast(var.dtype))
        loaded.append(key)
        touched.append(var)
    jt.sync(touched)
    return loaded


@dataclass
class ModulePairing:
    """The port's modules under the reference's names.

    Attributes:
        named: ``(official name, port module)``, parents first (the reference's order).
        how: Official name -> how it was paired: ``name``, ``key map`` or ``call order``.
        port_names: Official name -> the port's own name for that module.
        unpaired_reference: Reference modules with no counterpart.
        unpaired_port: Port modules with no counterpart.
        not_loaded: Paired reference modules whose own tensors were not (all) loaded into the
            port, with their count: their calls are not compared (they would show the
            weights, not the code); inside their parents' isolated calls they are answered
            with the reference's outputs, as every child is.
    """

    named: list[tuple[str, Any]]
    how: dict[str, str]
    port_names: dict[str, str]
    unpaired_reference: list[str] = field(default_factory=list)
    unpaired_port: list[str] = field(default_factory=list)
    not_loaded: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many pairs each method made."""
        out: dict[str, int] = {}
        for method in self.how.values():
            out[method] = out.get(method, 0) + 1
        return out

    def describe(self) -> str:
        """One line: pairs by method, modules left unpaired on each side."""
        by = ", ".join(f"{n} by {m}" for m, n in sorted(self.counts().items()))
        return (f"modules paired: {by}; unpaired: {len(self.unpaired_reference)} reference, "
                f"{len(self.unpaired_port)} port")


def _subtree_keys(named: list[tuple[str, Any]], keys: list[str]) -> dict[str, frozenset]:
    out = {}
    for name, _ in named:
        prefix = f"{name}." if name else ""
        out[name] = frozenset(k for k in keys if k.startswith(prefix))
    return out


def pair_modules(torch_model: Any, port_model: Any, key_map: Mapping[str, str],
                 loaded: list[str], calls: tuple[list, list] | None = None,
                 present: list[str] | None = None) -> ModulePairing:
    """Pairs the port's modules with the reference's.

    In order: the same name (the port keeps the official module tree); the same state-dict
    tensors below the module, through the key map (nested wrappers holding the same tensors
    pair in nesting order); then, for modules without loaded tensors (activations, pooling,
    containers of unloaded weights), the same position in the call order with the same output
    shapes, among the children of one already paired module.

    Args:
        torch_model: The reference.
        port_model: The port.
        key_map: Official state-dict name -> port name (the user's, completed with the
            suggested one for the names it leaves out: it pairs modules, it loads nothing).
        loaded: The official names loaded into the port.
        calls: ``(reference, port)`` call records of one forward, each a list of ``(module
            name, output shape signature)`` in call order (:func:`record_calls`); without
            them no pair is made by call order.
        present: The official names whose mapped name the port has (default ``loaded``):
            the tensors that pair modules.
    """
    ref_named = list(torch_model.named_modules())
    port_named = list(port_model.named_modules())
    ref_modules, port_modules = dict(ref_named), dict(port_named)
    how: dict[str, str] = {}
    port_of: dict[str, str] = {}
    for name, _ in ref_named:
        if name in port_modules:
            how[name], port_of[name] = "name", name
    present = loaded if present is None else present
    if any(key_map.get(k, k) != k for k in present):
        ref_keys = _subtree_keys(ref_named, present)
        port_keys = _subtree_keys(port_named, [key_map.get(k, k) for k in present])
        by_keys: dict[frozenset, list[str]] = {}
        for name, _ in port_named:
            if port_keys[name]:
                by_keys.setdefault(port_keys[name], []).append(name)
        wanted: dict[frozenset, list[str]] = {}
        for name, _ in ref_named:
            if ref_keys[name]:
                mapped = frozenset(key_map.get(k, k) for k in ref_keys[name])
                wanted.setdefault(mapped, []).append(name)
        taken = set(port_of.values())
        for keys, names in wanted.items():
            candidates = [p for p in by_keys.get(keys, []) if p not in taken]
            for name, theirs in zip([n for n in names if n not in port_of], candidates):
                how[name], port_of[name] = "key map", theirs
                taken.add(theirs)
    if calls is not None:
        _pair_by_calls(calls, ref_modules, port_modules, how, port_of)
    taken = set(port_of.values())
    missing = [k for k in torch_model.state_dict() if k not in set(loaded)]
    not_loaded: dict[str, int] = {}
    for key in missing:
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner in port_of:
            not_loaded[owner] = not_loaded.get(owner, 0) + 1
    named = [(name, port_modules[port_of[name]]) for name, _ in ref_named if name in port_of]
    return ModulePairing(named, how, port_of,
                         [n for n, _ in ref_named if n not in port_of],
                         [n for n, _ in port_named if n not in taken], not_loaded)


def _contains(outer: str, inner: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(f"{outer}.")


def _parent_pair(name: str, port_of: Mapping[str, str]) -> str:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in port_of:
            return parent
    return ""


def _pair_by_calls(calls: tuple[list, list], ref_modules: dict, port_modules: dict,
                   how: dict[str, str], port_of: dict[str, str]) -> None:
    ref_calls, port_calls = calls
    port_of.setdefault("", "")
    how.setdefault("", "name")
    ref_of_port = {p: r for r, p in port_of.items()}

    def groups(records: list, paired: set[str], parent_of: Callable[[str], str]) -> dict:
        out: dict[str, list] = {}
        seen = set()
        for name, signature in records:
            if name in paired or name in seen or not name:
                continue
            seen.add(name)
            out.setdefault(parent_of(name), []).append((name, signature))
        return out

    ref_groups = groups(ref_calls, set(port_of), lambda n: _parent_pair(n, port_of))
    port_groups = groups(port_calls, set(ref_of_port),
                         lambda n: ref_of_port.get(_parent_pair(n, ref_of_port), ""))
    for parent, ref_seq in ref_groups.items():
        port_seq = port_groups.get(parent, [])
        pairs = align_by_order(dict(ref_seq), dict(port_seq), same=lambda a, b: a == b)
        for name, theirs in pairs.items():
            how[name], port_of[name] = "call order", theirs
            ref_of_port[theirs] = name


def record_calls(model: Any, run: Callable[[], Any], framework: str) -> list[tuple[str, tuple]]:
    """``(module name, output shapes)`` of every module call of ``run()``, in call order."""
    records: list[tuple[str, tuple]] = []
    named = list(model.named_modules())

    def signature(out: Any) -> tuple:
        if isinstance(out, dict):
            return tuple(signature(v) for _, v in sorted(out.items()))
        if isinstance(out, (list, tuple)):
            return tuple(signature(v) for v in out)
        return tuple(getattr(out, "shape", ()))

    handles = []
    for name, module in named:
        def hook(m, args, out, kwargs=None, name=name):
            records.append((name, signature(out)))
        if framework == "torch":
            handles.append(module.register_forward_hook(hook))
        elif "__fhook2__" not in vars(module) and "__fhook__" not in vars(module):
            module.register_forward_hook(hook)
            handles.append(module)
    try:
        run()
    finally:
        for h in handles:
            if framework == "torch":
                h.remove()
            else:
                h.remove_forward_hook()
    return records
