"""Building blocks shared by the RT-DETR backbone and hybrid encoder (Jittor).

Both official PResNet and the official HybridEncoder use the same
convolution / batch-norm / activation block with attributes ``conv``,
``norm`` and ``act``; it lives here once.

Differences from torch_ref/common.py:
    - Modules define ``execute`` (Jittor's name for ``forward``).
    - Jittor has no Hardsigmoid module; :class:`Hardsigmoid` is defined here.
      Jittor's ``nn.SiLU``/``nn.GELU`` (exact erf form) and ``nn.LeakyReLU``
      (slope 0.01) compute what torch's modules compute; :class:`ReLU` is
      Jittor's ``nn.ReLU`` computed by a multi-threaded kernel,
      :class:`AvgPool2d` stands in for torch's (Jittor's runs on one thread), and
      :class:`Linear` is Jittor's ``nn.Linear`` computed by one oneDNN kernel per
      pass (:func:`~jittor_impl._kernels.linear`, also the attention's input
      projections). :class:`Conv2d` is Jittor's ``nn.Conv2d`` with pointwise
      convolutions as oneDNN products in the NCHW layout
      (:func:`~jittor_impl._kernels.conv1x1`); ``ConvNormLayer.conv`` is one.
    - ``ConvNormLayer.norm`` is :class:`BatchNorm2d` defined here, not
      Jittor's ``nn.BatchNorm`` (which keeps the biased running variance and
      has no ``num_batches_tracked``).
    - Jittor-only additions that stand in for what torch provides:
      :class:`BatchNorm2d`, :class:`LayerNorm` and :class:`MultiheadAttention`
      with torch's attribute names and semantics, :class:`Dropout` that
      follows the module's training flag like torch, and the helpers
      :func:`named_children`, :func:`set_child` (Jittor's ``nn.Sequential``
      keeps its children in a ``layers`` dict, not as attributes),
      :func:`named_modules`, :func:`named_buffers`, :func:`named_parameters`
      and :func:`count_parameters`.
    - :class:`MultiheadAttention` multiplies its per-head matrices with
      :func:`batched_matmul` (written here): Jittor's CPU ``jt.matmul`` of
      batched operands is a broadcast product and sum (its derived gradient
      several times slower still), so the product and both gradients are
      per-slice 2-D oneDNN products, in one kernel
      (:func:`~jittor_impl._kernels.batched_sgemm`) where oneDNN is loaded, and
      the keys' transpose is a flag of the products, not a copy.
    - Jittor's fused CPU kernels run on one thread, torch's operators on all:
      :class:`BatchNorm2d` (both modes), :class:`ReLU`, :class:`AvgPool2d`,
      :class:`LayerNorm` and the attention softmax of
      :class:`MultiheadAttention` call the OpenMP kernels of
      :mod:`jittor_impl._kernels` on CPU (Jittor ops on CUDA).
    - Jittor's ``Module.eval()`` also marks every parameter ``stop_grad`` and
      ``train()`` restores the flags it saw at the first ``eval()``.
    - Buffer convention: Jittor's ``state_dict``/``parameters`` collect every
      ``jt.Var`` attribute whose name does not start with ``_``, buffers
      included. A module owning buffers lists their attribute names in
      ``_buffer_names``; buffers are ``stop_grad`` Vars. Frozen parameters
      (torch ``requires_grad=False``) stay parameters but are ``stop_grad``.
    - Jittor Vars cannot be 0-dim: ``BatchNorm2d.num_batches_tracked`` is an
      int64 Var of shape ``[1]`` (torch: shape ``[]``); checkpoint conversion
      reshapes it.
"""

import math
from typing import List, Optional, Tuple

import jittor as jt
from jittor import init, nn

from ._kernels import (avg_pool2d, batch_norm_train, batched_sgemm, channel_affine, conv1x1,
                       layer_norm, linear, relu, softmax_last)

__all__ = [
    "Hardsigmoid",
    "get_activation",
    "BatchNorm2d",
    "ReLU",
    "AvgPool2d",
    "Linear",
    "Conv2d",
    "LayerNorm",
    "Dropout",
    "MultiheadAttention",
    "ConvNormLayer",
    "named_children",
    "set_child",
    "named_modules",
    "named_buffers",
    "named_parameters",
    "count_parameters",
    "trainable_parameters",
]


class Hardsigmoid(nn.Module):
    """Piecewise-linear sigmoid ``relu6(x + 3) / 6`` (torch's ``nn.Hardsigmoid``)."""

    def execute(self, x: jt.Var) -> jt.Var:
        """Applies the activation.

        Args:
            x: Input of any shape.

        Returns:
            ``clamp(x / 6 + 1 / 2, 0, 1)``, same shape as ``x``.
        """
        return jt.minimum(jt.maximum(x + 3.0, 0.0), 6.0) / 6.0


class ReLU(nn.ReLU):
    """``max(x, 0)`` through :func:`jittor_impl._kernels.relu` (OpenMP kernels on CPU).

    A subclass of Jittor's ``nn.ReLU``, which computes the same values on one thread.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        """Applies the activation.

        Args:
            x: Float32 input of any shape.

        Returns:
            ``max(x, 0)``, same shape as ``x``.
        """
        return relu(x)


class AvgPool2d(nn.Module):
    """torch's ``nn.AvgPool2d`` through :func:`jittor_impl._kernels.avg_pool2d` (OpenMP
    kernels on CPU).

    Jittor's ``nn.AvgPool2d`` runs on one thread and refuses inputs no larger than the
    kernel, which torch pools.

    Attributes:
        kernel_size: Window size.
        stride: Window step (``kernel_size`` when not given).
        padding: Implicit zero padding on each side.
        ceil_mode: Whether the output size is rounded up.
        count_include_pad: Whether the padding counts in a window's divisor.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad

    def execute(self, x: jt.Var) -> jt.Var:
        """Averages each window of ``x``.

        Args:
            x: Float32 input ``[bs, c, h, w]``.

        Returns:
            ``[bs, c, out_h, out_w]``.
        """
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad)


class Linear(nn.Linear):
    """Jittor's ``nn.Linear`` (torch's parameter names) computed by
    :func:`jittor_impl._kernels.linear`: on CPU one oneDNN kernel forward and one backward,
    bias included, where Jittor's adds the bias and sums its gradient on one thread."""

    def execute(self, x: jt.Var) -> jt.Var:
        """Applies ``x @ weight^T + bias`` over the last axis.

        Args:
            x: Float32 ``[..., in_features]``.

        Returns:
            ``[..., out_features]``.
        """
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """Jittor's ``nn.Conv2d`` (torch's parameter names), with pointwise convolutions
    (1x1, stride 1, no padding, one group) computed by
    :func:`jittor_impl._kernels.conv1x1` on CPU where oneDNN is loaded: oneDNN products in
    the NCHW layout, where Jittor's convolution reorders the maps to a blocked layout and
    back. Every other convolution is Jittor's."""

    def execute(self, x: jt.Var) -> jt.Var:
        """Convolves ``x``.

        Args:
            x: Float32 ``[N, in_channels, H, W]``.

        Returns:
            ``[N, out_channels, H', W']``.
        """
        pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                     and self.groups == 1)
        if pointwise:
            return conv1x1(x, self.weight, self.bias)
        return super().execute(x)


_ACTIVATIONS = {
    "relu": ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "hardsigmoid": Hardsigmoid,
}


def get_activation(act: Optional[str]) -> nn.Module:
    """Builds an activation module from its name.

    The official code switches ReLU/SiLU/LeakyReLU to in-place mode; that does
    not change any value, so the modules here are created out of place.

    Args:
        act: One of ``'relu'``, ``'silu'``, ``'gelu'``, ``'leaky_relu'``,
            ``'hardsigmoid'`` (case-insensitive), or ``None`` for identity.

    Returns:
        A fresh activation module (``nn.Identity`` when ``act`` is ``None``).

    Raises:
        ValueError: If ``act`` is neither ``None`` nor a known name.
    """
    if act is None:
        return nn.Identity()
    if not isinstance(act, str):
        raise ValueError(f"activation must be a string or None, got {type(act).__name__}")
    key = act.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)} or None")
    return _ACTIVATIONS[key]()


class BatchNorm2d(nn.Module):
    """BatchNorm over ``[bs, c, h, w]`` with PyTorch's semantics.

    Training mode normalises with the batch mean and biased batch variance
    and updates ``running_mean`` / ``running_var`` as
    ``(1 - momentum) * old + momentum * new``, where ``new`` for the variance
    is the UNBIASED batch variance (``n / (n - 1)`` times the biased one,
    ``n = bs * h * w``), and counts ``num_batches_tracked``. Eval mode
    normalises with the running statistics.

    Attributes:
        num_features: Number of channels.
        eps: Value added to the variance before the square root.
        momentum: Weight of the new batch statistics in the running ones.
        weight: Scale, parameter ``[c]``.
        bias: Shift, parameter ``[c]``.
        running_mean: Buffer ``[c]``.
        running_var: Buffer ``[c]`` (unbiased estimate).
        num_batches_tracked: Buffer, int64 ``[1]`` (torch: int64 ``[]``).
    """

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        """Initialises identity statistics.

        Args:
            num_features: Number of channels.
            eps: Value added to the variance before the square root.
            momentum: Weight of the new batch statistics in the running ones.
        """
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = jt.ones((num_features,), "float32")
        self.bias = jt.zeros((num_features,), "float32")
        self.running_mean = jt.zeros((num_features,), "float32").stop_grad()
        self.running_var = jt.ones((num_features,), "float32").stop_grad()
        self.num_batches_tracked = jt.zeros((1,), "int64").stop_grad()

    def execute(self, x: jt.Var) -> jt.Var:
        """Normalises ``x`` per channel.

        Args:
            x: Input of shape ``[bs, c, h, w]``.

        Returns:
            Tensor of the same shape as ``x``.

        Raises:
            ValueError: In training mode, when each channel has a single value.
        """
        if self.training:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n <= 1:
                raise ValueError(f"expected more than 1 value per channel when training, got input "
                                 f"of shape {list(x.shape)}")
            y, batch_mean, batch_var = batch_norm_train(x, self.weight, self.bias, self.eps)
            with jt.no_grad():
                m = self.momentum
                unbiased = batch_var * (n / (n - 1))  # [c]
                self.running_mean.update((1.0 - m) * self.running_mean + m * batch_mean)
                self.running_var.update((1.0 - m) * self.running_var + m * unbiased)
                self.num_batches_tracked.update(self.num_batches_tracked + 1)
            return y
        scale = self.weight / jt.sqrt(self.running_var + self.eps)  # [c]
        shift = self.bias - self.running_mean * scale  # [c]
        return channel_affine(x, scale, shift)

    def extra_repr(self) -> str:
        """Returns the printable configuration."""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class LayerNorm(nn.Module):
    """LayerNorm over the last axes with torch's semantics, through
    :func:`jittor_impl._kernels.layer_norm` (OpenMP kernels on CPU).

    Jittor's ``nn.LayerNorm`` takes the variance as ``E[x^2] - E[x]^2``,
    which loses precision on inputs with a large mean; this one subtracts
    the mean first (in float64 on CPU).

    Attributes:
        normalized_shape: Shape of the normalised trailing axes.
        eps: Value added to the variance before the square root.
        elementwise_affine: Whether ``weight`` and ``bias`` exist.
        weight: Scale parameter of ``normalized_shape`` (or ``None``).
        bias: Shift parameter of ``normalized_shape`` (or ``None``).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
        """Initialises the layer.

        Args:
            normalized_shape: Size (int) or shape (sequence) of the trailing axes.
            eps: Value added to the variance before the square root.
            elementwise_affine: Whether to learn a scale and a shift.
        """
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = jt.ones(self.normalized_shape, "float32")
            self.bias = jt.zeros(self.normalized_shape, "float32")
        else:
            self.weight = None
            self.bias = None

    def execute(self, x: jt.Var) -> jt.Var:
        """Normalises ``x`` over its trailing ``len(normalized_shape)`` axes.

        Args:
            x: Float32 input whose trailing shape equals ``normalized_shape``.

        Returns:
            Tensor of the same shape as ``x``.

        Raises:
            ValueError: If the trailing shape of ``x`` is not ``normalized_shape``.
        """
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm{self.normalized_shape}: input {list(x.shape)} does not end in "
                             f"{list(self.normalized_shape)}")
        d = math.prod(self.normalized_shape)
        if self.elementwise_affine:
            weight, bias = self.weight.reshape(d), self.bias.reshape(d)  # [d]
        else:
            weight, bias = jt.ones((d,), "float32"), jt.zeros((d,), "float32")
        rows = x.reshape(*x.shape[:x.ndim - k], d)  # [..., d]
        return layer_norm(rows, weight, bias, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        """Returns the printable configuration."""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class Dropout(nn.Module):
    """Dropout that follows the module's training flag, like torch's.

    Jittor's ``nn.Dropout`` starts in eval mode (``is_train=False``) while
    torch modules start in training mode; this one starts in training mode.
    The random mask comes from Jittor's generator, so dropped positions
    differ from torch's for the same seed.

    Attributes:
        p: Probability of zeroing an element.
    """

    def __init__(self, p: float = 0.5):
        """Initialises the layer.

        Args:
            p: Probability of zeroing an element, in ``[0, 1]``.

        Raises:
            ValueError: If ``p`` is outside ``[0, 1]``.
        """
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def execute(self, x: jt.Var) -> jt.Var:
        """Zeroes elements with probability ``p`` in training mode.

        Args:
            x: Input of any shape.

        Returns:
            ``x`` with dropped elements zeroed and the others scaled by
            ``1 / (1 - p)`` in training mode; ``x`` itself otherwise.
        """
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = (jt.rand(x.shape) >= self.p).cast(x.dtype)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        """Returns the printable configuration."""
        return f"p={self.p}"


class _BatchedMatmul(jt.Function):
    """Batched matrix product on CPU, forward and gradients as 2-D products.

    Jittor's CPU ``jt.matmul`` hands only 2-D products to oneDNN; a batched one is a
    broadcast ``[n, m, k, p]`` product summed over ``k``, and the gradients Jittor derives from
    it reduce ``[n, m, k, p]`` products over ``m`` or ``p`` (measured: about 6x the forward for
    ``[16, 500, 32]`` heads). Here the product and both gradients (``grad_out @ b^T``,
    ``a^T @ grad_out``) are each ``n`` oneDNN 2-D products with the transposes as flags
    (:func:`_products`): as stacked 2-D products, 2.7x faster than the broadcast form for
    ``[16, 400, 32] @ [16, 32, 400]`` and 8x for ``[16, 400, 400] @ [16, 400, 32]`` (the
    attention heads of r18vd's encoder at 640, 2 threads), and as one kernel of them 3.5x
    faster again for the first.
    """

    def execute(self, a: jt.Var, b: jt.Var, transpose_b: bool) -> jt.Var:
        """Returns ``a @ op(b)`` for ``a`` ``[n, m, k]`` and ``b`` ``[n, k, p]`` (``[n, p, k]``
        with ``transpose_b``)."""
        self.a, self.b, self.transpose_b = a, b, transpose_b
        return batched_sgemm(a, b, transpose_b=transpose_b)  # [n, m, p]

    def grad(self, grad_out: jt.Var) -> Tuple[jt.Var, jt.Var, None]:
        """Gradients ``grad_out @ op(b)^T`` and ``a^T @ grad_out`` (transposed back for a
        transposed ``b``: ``grad_out^T @ a``)."""
        grad_a = batched_sgemm(grad_out, self.b, transpose_b=not self.transpose_b)  # [n, m, k]
        if self.transpose_b:
            return grad_a, batched_sgemm(grad_out, self.a, transpose_a=True), None  # [n, p, k]
        return grad_a, batched_sgemm(self.a, grad_out, transpose_a=True), None  # [n, k, p]


def batched_matmul(a: jt.Var, b: jt.Var, transpose_b: bool = False) -> jt.Var:
    """Batched matrix product ``[n, m, k] @ [n, k, p] -> [n, m, p]``, fast on CPU.

    On CPU the product and its gradients are 2-D oneDNN products (see
    :class:`_BatchedMatmul`); on CUDA it is ``jt.matmul`` itself (cuBLAS batched).

    Args:
        a: ``[n, m, k]``.
        b: ``[n, k, p]``, or ``[n, p, k]`` with ``transpose_b``.
        transpose_b: Multiply by the transpose of each slice of ``b`` (a flag of the
            products on CPU, where a transposed copy is a single-threaded kernel).

    Returns:
        ``[n, m, p]``.
    """
    from ._kernels import uses_kernel
    if not uses_kernel("batched_matmul"):
        return jt.matmul(a, b.transpose(0, 2, 1) if transpose_b else b)
    return _BatchedMatmul.apply(a, b, transpose_b)


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch's parameter names and semantics.

    Same state dict as torch's ``nn.MultiheadAttention`` with equal q/k/v
    widths: ``in_proj_weight [3 * d, d]``, ``in_proj_bias [3 * d]``,
    ``out_proj.weight [d, d]``, ``out_proj.bias [d]``. Queries are scaled by
    ``head_dim ** -0.5``; dropout acts on the attention weights in training
    mode; the returned weights are averaged over heads.

    Attributes:
        embed_dim: Model width ``d``.
        num_heads: Number of heads.
        dropout: Dropout probability on the attention weights.
        batch_first: Inputs are ``[bs, L, d]`` if True, else ``[L, bs, d]``.
        head_dim: ``d // num_heads``.
        in_proj_weight: Stacked q, k, v projection weights ``[3 * d, d]``.
        in_proj_bias: Stacked q, k, v projection biases ``[3 * d]``.
        out_proj: Output :class:`Linear` ``(d, d)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = True):
        """Initialises the layer like torch.

        ``in_proj_weight`` is Xavier-uniform, both biases are zero and
        ``out_proj.weight`` keeps Jittor's ``nn.Linear`` uniform initialisation.

        Args:
            embed_dim: Model width.
            num_heads: Number of heads (must divide ``embed_dim``).
            dropout: Dropout probability on the attention weights.
            batch_first: Whether inputs are ``[bs, L, d]``.

        Raises:
            ValueError: If ``embed_dim`` is not divisible by ``num_heads``.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = init.xavier_uniform((3 * embed_dim, embed_dim), "float32")
        self.in_proj_bias = jt.zeros((3 * embed_dim,), "float32")
        self.out_proj = Linear(embed_dim, embed_dim)
        self.out_proj.bias = jt.zeros((embed_dim,), "float32")

    def _split_heads(self, x: jt.Var) -> jt.Var:
        """Splits ``[bs, L, d]`` into ``[bs, num_heads, L, head_dim]``."""
        bs, length = x.shape[0], x.shape[1]
        x = x.reshape(bs, length, self.num_heads, self.head_dim)  # [bs, L, h, hd]
        return x.permute(0, 2, 1, 3)  # [bs, h, L, hd]

    def execute(self, query: jt.Var, key: jt.Var, value: jt.Var, attn_mask: Optional[jt.Var] = None,
                need_weights: bool = True) -> Tuple[jt.Var, Optional[jt.Var]]:
        """Attends ``query`` to ``key``/``value``.

        Args:
            query: ``[bs, Lq, d]`` (``[Lq, bs, d]`` if not ``batch_first``).
            key: ``[bs, Lk, d]`` (``[Lk, bs, d]`` if not ``batch_first``).
            value: ``[bs, Lk, d]`` (``[Lk, bs, d]`` if not ``batch_first``).
            attn_mask: Optional ``[Lq, Lk]`` or ``[bs * num_heads, Lq, Lk]``
                mask; boolean (True = may not attend) or float (added to the
                attention logits).
            need_weights: Whether to return the head-averaged attention weights.

        Returns:
            Tuple of the output (same layout as ``query``) and the attention
            weights ``[bs, Lq, Lk]`` (``None`` if ``need_weights`` is False).

        Raises:
            ValueError: If ``attn_mask`` has an unsupported shape.
        """
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bs, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        d = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        q = linear(query, w[:d], b[:d])  # [bs, Lq, d]
        k = linear(key, w[d:2 * d], b[d:2 * d])  # [bs, Lk, d]
        v = linear(value, w[2 * d:], b[2 * d:])  # [bs, Lk, d]
        q = self._split_heads(q) * (float(self.head_dim) ** -0.5)  # [bs, h, Lq, hd]
        k = self._split_heads(k)  # [bs, h, Lk, hd]
        v = self._split_heads(v)  # [bs, h, Lk, hd]
        # [bs*h, Lq, hd] @ [bs*h, Lk, hd]^T -> [bs*h, Lq, Lk] -> [bs, h, Lq, Lk]
        logits = batched_matmul(q.reshape(-1, len_q, self.head_dim),
                                k.reshape(-1, len_k, self.head_dim), transpose_b=True)
        logits = logits.reshape(bs, self.num_heads, len_q, len_k)
        if attn_mask is not None:
            if attn_mask.ndim == 2 and tuple(attn_mask.shape) == (len_q, len_k):
                mask = attn_mask.reshape(1, 1, len_q, len_k)  # [1, 1, Lq, Lk]
            elif attn_mask.ndim == 3 and tuple(attn_mask.shape) == (bs * self.num_heads, len_q, len_k):
                mask = attn_mask.reshape(bs, self.num_heads, len_q, len_k)  # [bs, h, Lq, Lk]
            else:
                raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not match "
                                 f"[{len_q}, {len_k}] or [{bs * self.num_heads}, {len_q}, {len_k}]")
            if mask.dtype == jt.bool:
                mask = jt.zeros(mask.shape, logits.dtype).masked_fill(mask, float("-inf"))
            logits = logits + mask
        attn = softmax_last(logits)  # [bs, h, Lq, Lk]
        if self.training and self.dropout > 0.0:
            keep = (jt.rand(attn.shape) >= self.dropout).cast(attn.dtype)
            attn = attn * keep / (1.0 - self.dropout)
        # [bs*h, Lq, Lk] @ [bs*h, Lk, hd] -> [bs*h, Lq, hd] -> [bs, h, Lq, hd]
        out = batched_matmul(attn.reshape(-1, len_q, len_k), v.reshape(-1, len_k, self.head_dim))
        out = out.reshape(bs, self.num_heads, len_q, self.head_dim)
        out = out.permute(0, 2, 1, 3).reshape(bs, len_q, d)  # [bs, Lq, d]
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = attn.mean(dim=1) if need_weights else None  # [bs, Lq, Lk]
        return out, weights

    def extra_repr(self) -> str:
        """Returns the printable configuration."""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


class ConvNormLayer(nn.Module):
    """Conv2d followed by BatchNorm2d and an activation.

    Attributes:
        conv: The :class:`Conv2d`.
        norm: The :class:`BatchNorm2d` over ``ch_out`` channels.
        act: The activation module (``nn.Identity`` when ``act`` is ``None``).
    """

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        kernel_size: int,
        stride: int,
        padding: Optional[int] = None,
        bias: bool = False,
        act: Optional[str] = None,
    ):
        """Initialises the layer.

        Args:
            ch_in: Number of input channels.
            ch_out: Number of output channels.
            kernel_size: Square kernel size.
            stride: Convolution stride.
            padding: Zero padding; ``(kernel_size - 1) // 2`` when ``None``.
            bias: Whether the convolution has a bias term.
            act: Activation name passed to :func:`get_activation`.
        """
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2
        self.conv = Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bool(bias))
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def execute(self, x: jt.Var) -> jt.Var:
        """Applies conv, norm and activation.

        Args:
            x: Input of shape ``[bs, ch_in, h, w]``.

        Returns:
            Tensor of shape ``[bs, ch_out, h', w']``.
        """
        return self.act(self.norm(self.conv(x)))


def named_children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Lists the direct child modules of ``module`` with their names.

    Jittor keeps the children of ``nn.Sequential`` (and ``nn.ModuleList``,
    the same class) in its ``layers`` dict, and those of other modules as
    attributes.

    Args:
        module: Parent module.

    Returns:
        ``(name, child)`` pairs in definition order.
    """
    if isinstance(module, nn.Sequential):
        return list(module.layers.items())
    return [(name, child) for name, child in vars(module).items() if isinstance(child, nn.Module)]


def set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    """Replaces the direct child ``name`` of ``module`` by ``child``.

    Args:
        module: Parent module.
        name: Name of the child, as :func:`named_children` gives it.
        child: The new child module.
    """
    if isinstance(module, nn.Sequential):
        module.layers[name] = child
    else:
        setattr(module, name, child)


def named_modules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Lists ``module`` and its descendants with dotted names, parents first.

    Args:
        module: Root module (named ``''``).

    Returns:
        ``(name, module)`` pairs in definition order, each module once.
    """
    return module.named_modules()


def _listed_keys(module: nn.Module, listing: str) -> set:
    """State-dict keys of the attributes each descendant names in its ``listing`` tuple."""
    keys = set()
    for prefix, sub in named_modules(module):
        for name in getattr(sub, listing, ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def named_buffers(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """Lists the buffers of ``module`` and its descendants.

    A buffer is a state-dict Var whose attribute name is listed in the owning
    module's ``_buffer_names``.

    Args:
        module: Root module.

    Returns:
        ``(state-dict key, Var)`` pairs in state-dict order.
    """
    buffer_keys = _listed_keys(module, "_buffer_names")
    return [(key, var) for key, var in module.state_dict().items() if key in buffer_keys]


def named_parameters(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """Lists the parameters of ``module`` by the PyTorch convention.

    Every state-dict Var that is not a buffer (see :func:`named_buffers`) is a
    parameter, frozen (``stop_grad``) ones included.

    Args:
        module: Root module.

    Returns:
        ``(state-dict key, Var)`` pairs in state-dict order.
    """
    buffer_keys = {key for key, _ in named_buffers(module)}
    return [(key, var) for key, var in module.state_dict().items() if key not in buffer_keys]


def count_parameters(module: nn.Module) -> int:
    """Counts parameter elements by the PyTorch convention (buffers excluded).

    Args:
        module: Root module.

    Returns:
        Total number of elements of :func:`named_parameters`.
    """
    return sum(int(math.prod(var.shape)) for _, var in named_parameters(module))


def trainable_parameters(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """Lists the parameters an optimizer updates (torch: ``requires_grad`` ones).

    The PyTorch-convention parameters minus the frozen ones (names in the owning module's
    ``_frozen_names``). Unlike ``Var.is_stop_grad()``, this does not depend on whether the
    model is in eval mode, where Jittor marks every parameter ``stop_grad``.

    Args:
        module: Root module.

    Returns:
        ``(state-dict key, Var)`` pairs in state-dict order.
    """
    frozen = _listed_keys(module, "_frozen_names")
    return [(key, var) for key, var in named_parameters(module) if key not in frozen]
