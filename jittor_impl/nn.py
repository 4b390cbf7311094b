"""Torch-semantics layers of the Jittor port, where Jittor has no such module or its own differs from
torch's, and helpers that walk modules by torch's naming (this file has no torch_ref twin).
"""

import math
from typing import List, Optional, Tuple

import jittor as jt
from jittor import init, nn

from ._kernels import (avg_pool2d, batch_norm_train, batched_sgemm, channel_affine, conv1x1,
                       layer_norm, linear, relu, softmax_last, uses_kernel)

__all__ = [
    "Hardsigmoid",
    "BatchNorm2d",
    "ReLU",
    "AvgPool2d",
    "Linear",
    "Conv2d",
    "LayerNorm",
    "Dropout",
    "batched_matmul",
    "MultiheadAttention",
    "named_children",
    "set_child",
    "named_modules",
    "named_buffers",
    "named_parameters",
    "count_parameters",
    "trainable_parameters",
]


class Hardsigmoid(nn.Module):
    """torch.nn.Hardsigmoid: ``relu6(x + 3) / 6`` elementwise (Jittor has no such module)."""

    def execute(self, x: jt.Var) -> jt.Var:
        return jt.minimum(jt.maximum(x + 3.0, 0.0), 6.0) / 6.0


class ReLU(nn.ReLU):
    """torch.nn.ReLU: ``max(x, 0)``, through :func:`jittor_impl._kernels.relu` (multi-threaded on CPU)."""

    def execute(self, x: jt.Var) -> jt.Var:
        return relu(x)


class AvgPool2d(nn.Module):
    """torch.nn.AvgPool2d: padding, ``ceil_mode`` and ``count_include_pad`` as in torch, also on inputs no
    larger than the kernel (Jittor's refuses them); computed by :func:`jittor_impl._kernels.avg_pool2d`."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad

    def execute(self, x: jt.Var) -> jt.Var:
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad)


class Linear(nn.Linear):
    """torch.nn.Linear: ``x @ weight^T + bias`` over the last axis, torch's parameter names (Jittor's module).

    On CPU :func:`jittor_impl._kernels.linear` computes each pass, bias included, as one oneDNN kernel."""

    def execute(self, x: jt.Var) -> jt.Var:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d: Jittor's ``nn.Conv2d``, torch's parameter names and values.

    Pointwise convolutions (1x1, stride 1, no padding, one group) go to :func:`jittor_impl._kernels.conv1x1`
    (oneDNN products in the NCHW layout on CPU where oneDNN is loaded); the others are Jittor's."""

    def execute(self, x: jt.Var) -> jt.Var:
        pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                     and self.groups == 1)
        if pointwise:
            return conv1x1(x, self.weight, self.bias)
        return super().execute(x)


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d: batch statistics in training, running statistics in eval, momentum update
    with the unbiased variance (Jittor's ``nn.BatchNorm`` keeps the biased one and no counter).

    ``num_batches_tracked`` is an int64 Var of shape ``[1]`` (torch: ``[]``; Jittor Vars cannot be 0-dim)."""

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
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
        if self.training:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n <= 1:
                raise ValueError(f"expected more than 1 value per channel when training, got input "
                                 f"of shape {list(x.shape)}")
            y, batch_mean, batch_var = batch_norm_train(x, self.weight, self.bias, self.eps)
            with jt.no_grad():
                m = self.momentum
                unbiased = batch_var * (n / (n - 1))
                self.running_mean.update((1.0 - m) * self.running_mean + m * batch_mean)
                self.running_var.update((1.0 - m) * self.running_var + m * unbiased)
                self.num_batches_tracked.update(self.num_batches_tracked + 1)
            return y
        scale = self.weight / jt.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return channel_affine(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the trailing ``normalized_shape`` axes: the mean is subtracted before the variance.

    Computed by :func:`jittor_impl._kernels.layer_norm` (float64 on CPU); Jittor's ``nn.LayerNorm`` takes
    ``E[x^2] - E[x]^2``, which loses precision when the mean is large."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
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
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm{self.normalized_shape}: input {list(x.shape)} does not end in "
                             f"{list(self.normalized_shape)}")
        d = math.prod(self.normalized_shape)
        if self.elementwise_affine:
            weight, bias = self.weight.reshape(d), self.bias.reshape(d)
        else:
            weight, bias = jt.ones((d,), "float32"), jt.zeros((d,), "float32")
        rows = x.reshape(*x.shape[:x.ndim - k], d)
        return layer_norm(rows, weight, bias, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class Dropout(nn.Module):
    """torch.nn.Dropout: zeroes elements with probability ``p`` and scales the rest by ``1 / (1 - p)`` in training.

    Starts in training mode like torch modules (Jittor's starts in eval mode); the mask comes from
    Jittor's generator, so dropped positions differ from torch's for the same seed."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def execute(self, x: jt.Var) -> jt.Var:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = (jt.rand(x.shape) >= self.p).cast(x.dtype)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _BatchedMatmul(jt.Function):
    """``a @ op(b)`` for ``[n, m, k]`` operands on CPU: forward and both gradients as ``n`` 2-D oneDNN products,
    transposes as flags (Jittor's batched ``jt.matmul`` is a broadcast product and sum, its gradient slower still)."""

    def execute(self, a: jt.Var, b: jt.Var, transpose_b: bool) -> jt.Var:
        self.a, self.b, self.transpose_b = a, b, transpose_b
        return batched_sgemm(a, b, transpose_b=transpose_b)

    def grad(self, grad_out: jt.Var) -> Tuple[jt.Var, jt.Var, None]:
        grad_a = batched_sgemm(grad_out, self.b, transpose_b=not self.transpose_b)  # [n, m, k]
        if self.transpose_b:
            return grad_a, batched_sgemm(grad_out, self.a, transpose_a=True), None  # [n, p, k]
        return grad_a, batched_sgemm(self.a, grad_out, transpose_a=True), None  # [n, k, p]


def batched_matmul(a: jt.Var, b: jt.Var, transpose_b: bool = False) -> jt.Var:
    """``[n, m, k] @ [n, k, p] -> [n, m, p]`` (``b`` as ``[n, p, k]`` with ``transpose_b``):
    :class:`_BatchedMatmul` or ``jt.matmul``, as ``kernels.OPERATORS`` says."""
    if not uses_kernel("batched_matmul"):
        return jt.matmul(a, b.transpose(0, 2, 1) if transpose_b else b)
    return _BatchedMatmul.apply(a, b, transpose_b)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (equal q/k/v widths): same state dict, queries scaled by
    ``head_dim ** -0.5``, dropout on the attention weights in training, weights averaged over heads.

    Products are :func:`batched_matmul`, the softmax :func:`jittor_impl._kernels.softmax_last`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = True):
        """Xavier-uniform ``in_proj_weight``, zero biases; ``out_proj.weight`` keeps Jittor's ``nn.Linear`` init."""
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
        x = x.reshape(bs, length, self.num_heads, self.head_dim)
        return x.permute(0, 2, 1, 3)

    def execute(self, query: jt.Var, key: jt.Var, value: jt.Var, attn_mask: Optional[jt.Var] = None,
                need_weights: bool = True) -> Tuple[jt.Var, Optional[jt.Var]]:
        """Returns the output and the weights ``[bs, Lq, Lk]`` (or ``None``); ``attn_mask`` ``[Lq, Lk]`` or
        ``[bs * num_heads, Lq, Lk]`` is boolean (True: may not attend) or float (added to the logits)."""
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
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def named_children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, child)`` pairs of ``module``'s direct children, in definition order (Jittor's
    ``nn.Sequential`` keeps them in a ``layers`` dict, not as attributes)."""
    if isinstance(module, nn.Sequential):
        return list(module.layers.items())
    return [(name, child) for name, child in vars(module).items() if isinstance(child, nn.Module)]


def set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    """Replaces the direct child ``name`` (as :func:`named_children` names it) of ``module`` by ``child``."""
    if isinstance(module, nn.Sequential):
        module.layers[name] = child
    else:
        setattr(module, name, child)


def named_modules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(dotted name, module)`` pairs of ``module`` (named ``''``) and its descendants, parents first."""
    return module.named_modules()


def _listed_keys(module: nn.Module, listing: str) -> set:
    """State-dict keys of the attributes each descendant names in its ``listing`` tuple."""
    keys = set()
    for prefix, sub in named_modules(module):
        for name in getattr(sub, listing, ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def named_buffers(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """``(state-dict key, Var)`` pairs of the buffers: the Vars whose owning module lists their name in
    ``_buffer_names`` (Jittor's state dict holds every public Var attribute)."""
    buffer_keys = _listed_keys(module, "_buffer_names")
    return [(key, var) for key, var in module.state_dict().items() if key in buffer_keys]


def named_parameters(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """``(state-dict key, Var)`` pairs of torch's parameters: every state-dict Var that is not a buffer,
    frozen (``stop_grad``) ones included."""
    buffer_keys = {key for key, _ in named_buffers(module)}
    return [(key, var) for key, var in module.state_dict().items() if key not in buffer_keys]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements by torch's count (buffers excluded)."""
    return sum(int(math.prod(var.shape)) for _, var in named_parameters(module))


def trainable_parameters(module: nn.Module) -> List[Tuple[str, jt.Var]]:
    """:func:`named_parameters` minus the frozen ones (in the owner's ``_frozen_names``): what an optimizer
    updates; unlike ``Var.is_stop_grad()``, eval mode (where Jittor stops every gradient) does not change it."""
    frozen = _listed_keys(module, "_frozen_names")
    return [(key, var) for key, var in named_parameters(module) if key not in frozen]
