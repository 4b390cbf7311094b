"""Which implementation each operator runs on CPU and on CUDA, and why.

:func:`jittor_impl._kernels.uses_kernel` reads :data:`OPERATORS` to decide; ``README.md`` here is
:func:`render_readme`'s copy of it (``python -m jittor_impl.kernels`` rewrites it).
"""

from dataclasses import dataclass

KERNEL = "kernel"
OPS = "jittor ops"


@dataclass(frozen=True)
class Impl:
    """One operator's implementations.

    Attributes:
        cpu: What runs on CPU: ``KERNEL`` (the ``jt.code`` kernels of ``source``) or ``OPS``.
        cuda: What runs on CUDA, the same way.
        source: The kernels' C++ file here.
        ops: The operator composed of Jittor ops.
        why: Why the kernel exists.
        onednn: The kernels call oneDNN's ``sgemm``: where it is not loaded, ``ops`` runs on CPU.
        decided_in: The function that asks :func:`~jittor_impl._kernels.uses_kernel` (default:
            the operator's own function in ``jittor_impl._kernels``).
    """

    cpu: str
    cuda: str
    source: str
    ops: str
    why: str
    onednn: bool = False
    decided_in: str = ""

    def __post_init__(self) -> None:
        for side in (self.cpu, self.cuda):
            if side not in (KERNEL, OPS):
                raise ValueError(f"an implementation is {KERNEL!r} or {OPS!r}, got {side!r}")


OPERATORS = {
    "batch_norm_train": Impl(
        KERNEL, OPS, "normalisation.cc", "_batch_norm_train_ops",
        "training BatchNorm: channel statistics as float64 sums, one thread per channel"),
    "channel_affine": Impl(
        KERNEL, OPS, "normalisation.cc", "x * scale + shift (broadcast)",
        "eval-mode and frozen BatchNorm, parallel over channels"),
    "layer_norm": Impl(
        KERNEL, OPS, "normalisation.cc", "_layer_norm_ops",
        "row statistics and parameter gradients in float64, parallel over rows"),
    "relu": Impl(KERNEL, OPS, "activation.cc", "jittor.nn.relu",
                 "parallel over elements; the gradient is torch's (zero at 0)"),
    "softmax_last": Impl(
        KERNEL, OPS, "activation.cc", "jittor.nn.softmax(x, dim=-1)",
        "attention softmax, parallel over rows, row sums in float64"),
    "max_pool2d": Impl(
        KERNEL, OPS, "pooling.cc", "jittor.nn.max_pool2d",
        "parallel over planes, with torch's argmax and NaN rules"),
    "avg_pool2d": Impl(
        KERNEL, OPS, "pooling.cc", "jittor.nn.avg_pool2d",
        "parallel over planes, with torch's divisor rules"),
    "ms_deform_attn": Impl(
        KERNEL, OPS, "deformable_attention.cc",
        "jittor_impl.decoder.deformable_attention_core_func",
        "bilinear sampling and weighted sum in one pass, no gathered corner tensors",
        decided_in="jittor_impl.decoder.MSDeformableAttention.sample"),
    "swap_last_axes": Impl(
        KERNEL, OPS, "products.cc", "x.permute(0, 2, 1)",
        "token-layout transposes as a tiled copy, parallel over tiles"),
    "adamw_update": Impl(
        KERNEL, OPS, "optimizer.cc", "_adamw_update_ops",
        "one fused pass per parameter instead of a chain of element-wise kernels"),
    "batched_sgemm": Impl(
        KERNEL, OPS, "products.cc", "stacked 2-D jt.matmul (_slice_matmul)",
        "one kernel of per-slice sgemm calls (the product Jittor's CPU matmul calls, so the same "
        "bits) instead of n products, n slicings and a stack", onednn=True),
    "linear": Impl(
        KERNEL, OPS, "products.cc", "jittor.nn.linear",
        "one kernel forward and one backward, bias add and bias gradient included", onednn=True),
    "conv1x1": Impl(
        KERNEL, OPS, "products.cc", "jittor.nn.conv2d",
        "an sgemm per image in the NCHW layout; Jittor's convolution reorders both maps to a "
        "blocked layout and back", onednn=True),
    "batched_matmul": Impl(
        KERNEL, OPS, "products.cc", "jt.matmul (batched)",
        "attention heads: forward and gradients are batched_sgemm calls (which follow its row)",
        decided_in="jittor_impl.nn.batched_matmul"),
}

_INTRO = """\
# CPU kernels: which implementation runs where

Generated from `OPERATORS` in `operators.py` by `python -m jittor_impl.kernels`; do not edit
by hand (a test compares the two).

`kernel` is the operator's `jt.code` C++ kernels (snippets of its source file here, forward
and backward, OpenMP-parallel), `jittor ops` its composition of Jittor operators (why the port
has CPU kernels at all: `jittor_impl/_env.py`). On CUDA Jittor parallelises the compositions
itself and the kernels have no CUDA source. An operator marked oneDNN runs its Jittor ops on
CPU too where oneDNN's `dnnl_sgemm` is not loaded (`jittor_impl._kernels.has_dnnl_sgemm`).
`jittor_impl._kernels.uses_kernel(operator)` makes the choice from this table.

| operator | CPU | CUDA | oneDNN | source | Jittor ops | decided in | why |
|---|---|---|---|---|---|---|---|
"""


def render_readme() -> str:
    """The markdown of ``README.md``: an introduction and one table row per operator."""
    rows = []
    for name, impl in OPERATORS.items():
        decided_in = impl.decided_in or f"jittor_impl._kernels.{name}"
        rows.append(f"| `{name}` | {impl.cpu} | {impl.cuda} | {'yes' if impl.onednn else ''} | "
                    f"`{impl.source}` | `{impl.ops}` | `{decided_in}` | {impl.why} |")
    return _INTRO + "\n".join(rows) + "\n"
