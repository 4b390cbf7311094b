"""Per-module recording of one forward pass, in either framework, aligned by module name.

Every selected module gets hooks that record each of its calls: the inputs (positional and
keyword), the output, the shared random stream's state when the call started and, on the torch
side, the module's own buffers before and after the call. Module names are the dotted names of
torch's ``named_modules()``; ``jittor_impl.nn.named_modules`` gives the same names on the
port. A module called several times in one forward (a shared head, a reused activation) gets one
:class:`Call` per call, keyed ``name``, ``name#1``, ``name#2``...

Recording keeps references, not copies: a torch tensor is held detached (it shares storage
with the forward's own tensor, so the output of a convolution and the input of the next
BatchNorm are one array, not two) and a Jittor ``Var`` is held as it is. Arrays become numpy
only when a comparison asks for them (:func:`parity.arrays.to_numpy`), so memory is the forward's
activations kept alive, once (measured, every module of r18vd at 640, batch 2: 1.4 GB torch +
1.2 GB Jittor; r50vd: 3.5 + 3.0 GB; a :class:`ModuleFilter` or a smaller batch cuts it).
Holding a Jittor ``Var`` does not force its evaluation in the middle of the forward (reading
it there would split Jittor's fused kernels and move the outputs); Jittor computes the held
Vars in the same execution as the outputs. It does make Jittor compute a value the forward
would have discarded, which can change how it fuses the rest: such outputs are not held
(:data:`JITTOR_UNHELD_OUTPUTS`). :func:`verify_capture_transparent` checks that recording
leaves the final outputs bit-identical in both frameworks.

A torch tensor modified in place after it was recorded would make the record wrong; its
version counter is recorded too and :func:`parity.arrays.to_numpy` raises if it moved.

Hooks:
    torch: ``register_forward_pre_hook`` / ``register_forward_hook`` with ``with_kwargs=True``.
    Jittor 1.3.11: ``Module.register_pre_forward_hook`` / ``register_forward_hook``, which call
    ``hook(module, args[, kwargs])`` and ``hook(module, args, output[, kwargs])`` (kwargs only
    when the call had keyword arguments). Jittor keeps one hook of each kind per module and,
    the first time any instance of a class gets a hook, swaps that class's ``__call__`` for its
    hook-calling one for the rest of the process; without hooks set it calls ``execute`` as
    before.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import jittor as jt
import numpy as np
import torch

from jittor_impl.nn import named_buffers
from jittor_impl.nn import named_modules as jittor_named_modules

from .arrays import to_numpy
from .compare import iter_leaves
from .models import ModelPair, to_jittor

__all__ = [
    "NOT_RECORDED",
    "JITTOR_UNHELD_OUTPUTS",
    "ModuleRef",
    "ModuleFilter",
    "Call",
    "Capture",
    "TorchCapture",
    "JittorCapture",
    "module_depth",
    "torch_to_jittor_tree",
    "held_bytes",
    "verify_capture_transparent",
    "CaptureChangedResult",
]


class _NotRecorded:
    """Marks an output the capture deliberately did not hold (see :data:`JITTOR_UNHELD_OUTPUTS`)."""

    def __repr__(self) -> str:
        return "NOT_RECORDED"

    def __deepcopy__(self, memo: dict) -> "_NotRecorded":
        return self


NOT_RECORDED = _NotRecorded()

# Outputs the Jittor capture does not hold, by module class: positions in the returned tuple.
# Jittor evaluates lazily, so a value the forward discards is never computed. Holding the
# head-averaged attention weights of MultiheadAttention (both RT-DETR attention layers drop
# them) makes Jittor compute them from the softmax, which changes how it fuses the softmax
# and the attention product: measured, the final logits of r18vd at 256 moved by 2.9e-6. Every
# other module output is consumed by the forward anyway and holding it changes no bit. The
# isolated call of such a module still returns and compares them.
JITTOR_UNHELD_OUTPUTS: dict[str, tuple[int, ...]] = {"MultiheadAttention": (1,)}


@dataclass(frozen=True)
class ModuleRef:
    """A module passed as an argument (e.g. the decoder heads handed to the decoder loop)."""

    name: str


def module_depth(name: str) -> int:
    """Depth of a module name: 0 for the root ``''``, 1 for ``backbone``, 2 for ``backbone.conv1``.
    """
    return 0 if name == "" else name.count(".") + 1


@dataclass(frozen=True)
class ModuleFilter:
    """Which modules a capture records.

    A module is recorded when every given criterion holds. With no criterion every module is.

    Attributes:
        names: Exact module names to record, or None for no restriction.
        prefixes: Record only these modules and their descendants (``'decoder'`` matches
            ``decoder`` and ``decoder.enc_output.0``, not ``decoder_x``); empty: no restriction.
        max_depth: Record only names of at most this depth (see :func:`module_depth`).
        predicate: ``predicate(name, module) -> bool``, or None.
    """

    names: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ()
    max_depth: int | None = None
    predicate: Callable[[str, Any], bool] | None = None

    def __call__(self, name: str, module: Any) -> bool:
        """Whether the module ``name`` is recorded."""
        if self.names is not None and name not in self.names:
            return False
        if self.prefixes and not any(p == "" or name == p or name.startswith(p + ".")
                                     for p in self.prefixes):
            return False
        if self.max_depth is not None and module_depth(name) > self.max_depth:
            return False
        return self.predicate is None or bool(self.predicate(name, module))


@dataclass(eq=False)
class Call:
    """One call of one module during a recorded forward.

    Attributes:
        name: Module name (``''`` for the root).
        index: How many earlier calls of the same module the forward made.
        start: Position of this call among all recorded calls, by when it started.
        parent: ``start`` of the recorded call this one ran inside (-1 for none): the
            enclosing call in the call tree, which for a module passed as an argument (the
            decoder heads) is the module it was passed to.
        end: Position by when it returned (-1 while running): children end before parents.
        args: Positional inputs (held tensors/Vars, :class:`ModuleRef`, plain values).
        kwargs: Keyword inputs.
        output: What the module returned (held), None until it returns.
        rng_state: The model's shared random stream at the start of the call, or None.
        buffers_before: torch only: the module's own buffers (not its children's) as numpy
            copies when the call started; empty for modules without buffers.
        buffers_after: The same when the call returned.
    """

    name: str
    index: int
    start: int
    parent: int = -1
    end: int = -1
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Any = None
    rng_state: dict | None = None
    buffers_before: dict[str, np.ndarray] = field(default_factory=dict)
    buffers_after: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``name`` for the first call, ``name#k`` for the k-th later one (root: ``(model)``)."""
        name = self.name or "(model)"
        return name if self.index == 0 else f"{name}#{self.index}"

    def release(self) -> None:
        """Drops the held inputs and output so their memory can be freed."""
        self.args, self.kwargs, self.output = (), {}, None


@dataclass(frozen=True)
class _HeldTensor:
    """A detached torch tensor and its version counter when it was recorded."""

    tensor: torch.Tensor
    version: int

    def numpy(self) -> np.ndarray:
        """The tensor as numpy.

        Raises:
            RuntimeError: If the tensor was modified in place after it was recorded.
        """
        if self.tensor._version != self.version:
            raise RuntimeError("a recorded torch tensor was modified in place after recording "
                               f"(version {self.version} -> {self.tensor._version}, shape "
                               f"{tuple(self.tensor.shape)})")
        return self.tensor.cpu().numpy()


class Capture(abc.ABC):
    """Base of the two framework captures: a context manager that fills :attr:`calls`.

    Args:
        model: The model whose modules are hooked.
        select: Which modules to record (default: all).
        inputs: Record inputs.
        outputs: Record outputs.
    """

    _tensor_type: type  # the framework's tensor class
    _module_type: type  # the framework's module class

    def __init__(self, model: Any, select: Callable[[str, Any], bool] | None = None,
                 inputs: bool = True, outputs: bool = True) -> None:
        self.model = model
        self.select = select if select is not None else ModuleFilter()
        self.inputs = inputs
        self.outputs = outputs
        self.calls: list[Call] = []
        self._names: dict[int, str] = {}
        self._running: dict[int, list[Call]] = {}
        self._stack: list[Call] = []
        self._counts: dict[str, int] = {}
        self._ended = 0
        self._active = False
        self._installed: list[Any] = []
        self._module_names = {id(m): n for n, m in self.named_modules()}

    @abc.abstractmethod
    def named_modules(self) -> list[tuple[str, Any]]:
        """``(name, module)`` of the whole model, parents first."""

    def _hold(self, tree: Any) -> Any:
        """The framework's tensors of ``tree`` held for later; modules as :class:`ModuleRef`."""
        if isinstance(tree, self._tensor_type):
            return self._hold_tensor(tree)
        if isinstance(tree, self._module_type):
            if id(tree) not in self._module_names:
                raise ValueError(f"a module outside the model was passed as an argument: "
                                 f"{type(tree).__name__}")
            return ModuleRef(self._module_names[id(tree)])
        if isinstance(tree, dict):
            return {k: self._hold(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._hold(v) for v in tree)
        return copy.deepcopy(tree)

    @abc.abstractmethod
    def _hold_tensor(self, tensor: Any) -> Any:
        """One framework tensor held for later."""

    def _own_buffers(self, module: Any) -> dict[str, np.ndarray]:
        """Numpy copies of the module's own buffers (recorded on the torch side only)."""
        return {}

    @abc.abstractmethod
    def _install(self, module: Any) -> None:
        """Hooks ``_on_start`` / ``_on_end`` into one module."""

    @abc.abstractmethod
    def _uninstall(self, module: Any) -> None:
        """Removes the hooks of one module."""

    def _rng_state(self) -> dict | None:
        rng = getattr(self.model, "rng", None)
        return rng.state_dict() if rng is not None else None

    def _on_start(self, module: Any, args: tuple, kwargs: dict | None) -> None:
        name = self._names[id(module)]
        index = self._counts.get(name, 0)
        self._counts[name] = index + 1
        parent = self._stack[-1].start if self._stack else -1
        call = Call(name, index, len(self.calls), parent, rng_state=self._rng_state())
        if self.inputs:
            call.args = self._hold(tuple(args))
            call.kwargs = self._hold(dict(kwargs or {}))
        call.buffers_before = self._own_buffers(module)
        self.calls.append(call)
        self._stack.append(call)
        self._running.setdefault(id(module), []).append(call)

    def _on_end(self, module: Any, output: Any) -> None:
        call = self._running[id(module)].pop()
        self._stack.remove(call)
        call.end = self._ended
        self._ended += 1
        if self.outputs:
            call.output = self._hold(output)
        call.buffers_after = self._own_buffers(module)

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this capture is already recording")
        self.calls, self._counts, self._running, self._stack, self._ended = [], {}, {}, [], 0
        installed = []
        try:
            for name, module in self.named_modules():
                if self.select(name, module):
                    self._names[id(module)] = name
                    self._install(module)
                    installed.append(module)
        except BaseException:
            for module in installed:
                self._uninstall(module)
            raise
        self._installed = installed
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self._installed:
            self._uninstall(module)
        self._installed = []
        self._active = False

    def by_key(self) -> dict[str, Call]:
        """The recorded calls by :attr:`Call.key`."""
        return {c.key: c for c in self.calls}


class TorchCapture(Capture):
    """Records a torch model's module calls with forward (pre-)hooks.

    Args:
        model: A ``torch.nn.Module``.
        select: Which modules to record (default: all).
        inputs: Record inputs.
        outputs: Record outputs.
        buffers: Record each module's own buffers before and after every call.
    """

    _tensor_type = torch.Tensor
    _module_type = torch.nn.Module

    def __init__(self, model: torch.nn.Module, select: Callable[[str, Any], bool] | None = None,
                 inputs: bool = True, outputs: bool = True, buffers: bool = True) -> None:
        super().__init__(model, select, inputs, outputs)
        self.buffers = buffers
        self._handles: dict[int, list] = {}

    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        return list(self.model.named_modules())

    def _hold_tensor(self, tensor: torch.Tensor) -> _HeldTensor:
        held = tensor.detach()
        return _HeldTensor(held, held._version)

    def _own_buffers(self, module: torch.nn.Module) -> dict[str, np.ndarray]:
        if not self.buffers:
            return {}
        return {k: v.detach().numpy().copy() for k, v in module.named_buffers(recurse=False)}

    def _install(self, module: torch.nn.Module) -> None:
        pre = module.register_forward_pre_hook(
            lambda m, args, kwargs: self._on_start(m, args, kwargs), with_kwargs=True)
        post = module.register_forward_hook(
            lambda m, args, kwargs, out: self._on_end(m, out), with_kwargs=True)
        self._handles[id(module)] = [pre, post]

    def _uninstall(self, module: torch.nn.Module) -> None:
        for handle in self._handles.pop(id(module), []):
            handle.remove()


class JittorCapture(Capture):
    """Records a Jittor model's module calls with Jittor's forward (pre-)hooks.

    Jittor holds one hook of each kind per module; a module that already has one is refused
    rather than silently overwritten. Buffers are not recorded inside the forward: reading a
    Var there would force its evaluation mid-graph. Outputs the forward discards are not held
    (:data:`JITTOR_UNHELD_OUTPUTS`); they appear as :data:`NOT_RECORDED`.

    Args:
        model: A ``jittor.nn.Module``.
        select: Which modules to record (default: all).
        inputs: Record inputs.
        outputs: Record outputs.
        named: ``(name, module)`` to record under (default the model's own names; another
            port's modules under the reference's names, :func:`parity.ports.pair_modules`).
    """

    _tensor_type = jt.Var
    _module_type = jt.Module

    def __init__(self, model: Any, select: Callable[[str, Any], bool] | None = None,
                 inputs: bool = True, outputs: bool = True,
                 named: list[tuple[str, Any]] | None = None) -> None:
        self._named = named
        super().__init__(model, select, inputs, outputs)

    def named_modules(self) -> list[tuple[str, Any]]:
        return self._named if self._named is not None else jittor_named_modules(self.model)

    def _hold_tensor(self, tensor: jt.Var) -> jt.Var:
        return tensor

    def _on_end(self, module: Any, output: Any) -> None:
        unheld = JITTOR_UNHELD_OUTPUTS.get(type(module).__name__, ())
        if unheld and isinstance(output, tuple):
            output = tuple(NOT_RECORDED if i in unheld else v for i, v in enumerate(output))
        super()._on_end(module, output)

    def _install(self, module: Any) -> None:
        for attr in ("__fhook__", "__fhook2__"):
            if attr in vars(module):
                raise RuntimeError(f"Jittor module {self._names[id(module)]!r} already has a "
                                   f"forward hook; Jittor keeps only one")
        module.register_pre_forward_hook(
            lambda m, args, kwargs=None: self._on_start(m, args, kwargs))
        module.register_forward_hook(lambda m, args, out, kwargs=None: self._on_end(m, out))

    def _uninstall(self, module: Any) -> None:
        module.remove_pre_forward_hook()
        module.remove_forward_hook()


def torch_to_jittor_tree(tree: Any, modules: dict[str, Any]) -> Any:
    """Recorded torch inputs -> Jittor call arguments.

    Tensors become Vars with their dtype (int64 stays int64, bool stays bool), a
    :class:`ModuleRef` becomes the Jittor module of that name, nested lists/tuples/dicts keep
    their structure and plain values (ints, None, lists of ints) pass through.

    Args:
        tree: Recorded arguments (as in :attr:`Call.args` / :attr:`Call.kwargs`).
        modules: Jittor modules by name.
    """
    if isinstance(tree, (_HeldTensor, torch.Tensor)):
        return to_jittor(np.array(to_numpy(tree)))
    if isinstance(tree, ModuleRef):
        return modules[tree.name]
    if isinstance(tree, dict):
        return {k: torch_to_jittor_tree(v, modules) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(torch_to_jittor_tree(v, modules) for v in tree)
    return copy.deepcopy(tree)


def held_bytes(calls: Iterable[Call]) -> int:
    """Bytes of distinct arrays the calls keep alive (a shared array counted once)."""
    seen: dict[int, int] = {}
    for call in calls:
        for tree in (call.args, call.kwargs, call.output):
            for _, leaf in iter_leaves(tree):
                if isinstance(leaf, _HeldTensor):
                    t = leaf.tensor
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                elif isinstance(leaf, jt.Var):
                    seen[id(leaf)] = int(np.prod(leaf.shape)) * np.dtype(str(leaf.dtype)).itemsize
    return sum(seen.values())


class CaptureChangedResult(AssertionError):
    """Recording changed what a model computes."""


def _forward(pair: ModelPair, framework: str, images: np.ndarray,
             targets: list | None) -> Any:
    """One forward of one side of the pair, without gradients; numpy outputs.

    The Jittor side is synchronised as a whole (``jt.sync_all``), so Vars a capture holds
    are computed in the same execution as the outputs.
    """
    if framework == "torch":
        args = (torch.from_numpy(images),)
        if targets is not None:
            args += ([{k: torch.from_numpy(np.array(v)) for k, v in t.items()} for t in targets],)
        with torch.no_grad():
            return to_numpy(pair.torch_model(*args))
    args = (jt.array(images),)
    if targets is not None:
        args += (to_jittor(targets),)
    with jt.no_grad():
        out = pair.jittor_model(*args)
        jt.sync_all()
        return to_numpy(out)


def _buffer_state(pair: ModelPair, framework: str) -> list[tuple[Any, np.ndarray]]:
    """The model's buffers as ``(tensor or Var, numpy copy)`` pairs, to restore them later."""
    if framework == "torch":
        return [(b, b.detach().numpy().copy()) for b in pair.torch_model.buffers()]
    return [(v, v.numpy().copy()) for _, v in named_buffers(pair.jittor_model)]


def _restore_buffers(state: list[tuple[Any, np.ndarray]], framework: str) -> None:
    for holder, value in state:
        if framework == "torch":
            with torch.no_grad():
                holder.copy_(torch.from_numpy(value))
        else:
            var = jt.array(value)
            holder.update(var.int64() if value.dtype == np.int64 else var)


def verify_capture_transparent(pair: ModelPair, *, mode: str = "eval", images: np.ndarray,
                               targets: list | None = None,
                               frameworks: Sequence[str] = ("torch", "jittor"),
                               select: Callable[[str, Any], bool] | None = None) -> None:
    """Runs each model with and without recording every module and asserts identical bits.

    Between the two runs the shared random stream and the buffers (training-mode BatchNorm
    updates them) are restored, so both runs start from the same state; so is the model at
    the end.

    Args:
        pair: The model pair.
        mode: ``'eval'`` or ``'train'``.
        images: ``[bs, 3, h, w]`` float32.
        targets: Per-image ``labels``/``boxes`` numpy dicts (train mode), or None.
        frameworks: Which sides to check.
        select: Which modules the capture records (default: all).

    Raises:
        CaptureChangedResult: Naming the framework and the first output leaf that differs.
        ValueError: On an unknown mode or framework.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode == "eval":
        pair.eval()
    else:
        pair.train()
    for framework in frameworks:
        if framework not in ("torch", "jittor"):
            raise ValueError(f"framework must be 'torch' or 'jittor', got {framework!r}")
        model = pair.torch_model if framework == "torch" else pair.jittor_model
        rng = model.rng.state_dict()
        buffers = _buffer_state(pair, framework)
        plain = _forward(pair, framework, images, targets)
        model.rng.load_state_dict(rng)
        _restore_buffers(buffers, framework)
        cls = TorchCapture if framework == "torch" else JittorCapture
        with cls(model, select) as capture:
            recorded = _forward(pair, framework, images, targets)
        model.rng.load_state_dict(rng)
        _restore_buffers(buffers, framework)
        if not capture.calls:
            raise CaptureChangedResult(f"{framework}: the capture recorded no call")
        a, b = dict(iter_leaves(recorded)), dict(iter_leaves(plain))
        if list(a) != list(b):
            raise CaptureChangedResult(f"{framework}: outputs {sorted(set(a) ^ set(b))} appear "
                                       "on one side only")
        for path in b:
            x, y = np.asarray(a[path]), np.asarray(b[path])
            if x.dtype != y.dtype or x.shape != y.shape:
                raise CaptureChangedResult(f"{framework}: output {path!r} changed by recording: "
                                           f"{x.dtype}{list(x.shape)} != {y.dtype}{list(y.shape)}")
            if x.tobytes() != y.tobytes():
                gap = np.abs(x.astype(np.float64) - y.astype(np.float64)).max()
                raise CaptureChangedResult(f"{framework}: output {path!r} changed by recording "
                                           f"(max abs {gap:.3g})")
