"""Hand-laid-out Jittor ports of RT-DETR that the test suite checks through ``--port``.

Not jittor_impl's layout: the detector is ``Detector(net=Trunk(body, neck), head)``, modules
and their tensors carry other names at every level (``conv`` -> ``c``, ``norm`` -> ``bn``,
``res_layers`` -> ``stages``, ``dec_score_head`` -> ``cls_heads``...), the outputs are
``logits`` / ``boxes`` with ``xyxy`` boxes, and the postprocessor takes original sizes as
``(h, w)``. The computations are jittor_impl's building blocks, so a correct port here is
correct by construction and any difference the harness reports is the harness's or the bug's.

Factories (``--port handmade_rtdetr:<factory>`` with ``--port-path`` this folder):
    build_renamed: a correct port, renamed (needs a key map).
    build_buggy: the same with one porting bug: the first lateral convolution of the hybrid
        encoder activates with ReLU where the official config says SiLU.
    build_detached: the same with a stray ``detach`` in that convolution: the forward is
        unchanged, the backbone's gradients are not.
    build_eval_only: the official names, an eval forward only (no criterion, no
        postprocessor, no shared random stream).
    build_raising: a factory that fails.
"""

from __future__ import annotations

import jittor as jt
from jittor import nn

import jittor_impl
from jittor_impl.common import ConvNormLayer

# Renamed attributes per jittor_impl class: official attribute -> this port's.
RENAMES = {
    "PResNet": {"conv1": "stem", "res_layers": "stages"},
    "HybridEncoder": {"input_proj": "proj", "encoder": "aifi", "lateral_convs": "laterals",
                      "fpn_blocks": "top_down", "downsample_convs": "downs",
                      "pan_blocks": "bottom_up"},
    "RTDETRTransformer": {"input_proj": "in_proj", "decoder": "layers_stack",
                          "denoising_class_embed": "dn_embed", "query_pos_head": "pos_mlp",
                          "enc_output": "memory_proj", "enc_score_head": "enc_cls",
                          "enc_bbox_head": "enc_box", "dec_score_head": "cls_heads",
                          "dec_bbox_head": "box_heads"},
    "ConvNormLayer": {"conv": "c", "norm": "bn", "act": "f"},
}


def _rename(module: nn.Module, renames: dict[str, str]) -> None:
    """Moves attributes to new names; a subclass reads the old names through properties."""
    cls = type(module)
    props = {old: property(lambda self, new=new: getattr(self, new)) for old in renames
             for new in [renames[old]]}
    module.__class__ = type(f"Handmade{cls.__name__}", (cls,), props)
    for old, new in renames.items():
        module.__dict__[new] = module.__dict__.pop(old)


def _relayout(model: nn.Module) -> None:
    for _, module in list(model.named_modules()):
        renames = RENAMES.get(type(module).__name__)
        if renames:
            _rename(module, renames)


class Trunk(nn.Module):
    """Backbone and neck."""

    def __init__(self, body: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.neck = neck

    def execute(self, x: jt.Var) -> list:
        return self.neck(self.body(x))


def _to_port(out: dict) -> dict:
    """Official outputs -> this port's: ``logits``, ``boxes`` as normalised xyxy."""
    renamed = {}
    for key, value in out.items():
        if key == "pred_logits":
            renamed["logits"] = value
        elif key == "pred_boxes":
            cx, cy, w, h = (value[..., i] for i in range(4))
            renamed["boxes"] = jt.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        elif key in ("aux_outputs", "dn_aux_outputs", "enc_aux_outputs"):
            renamed[key] = [_to_port(o) for o in value]
        else:
            renamed[key] = value
    return renamed


def _to_official(out: dict) -> dict:
    official = {}
    for key, value in out.items():
        if key == "logits":
            official["pred_logits"] = value
        elif key == "boxes":
            x0, y0, x1, y1 = (value[..., i] for i in range(4))
            official["pred_boxes"] = jt.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
        elif key in ("aux_outputs", "dn_aux_outputs", "enc_aux_outputs"):
            official[key] = [_to_official(o) for o in value]
        else:
            official[key] = value
    return official


class Detector(nn.Module):
    """RT-DETR laid out as ``net`` (body, neck) and ``head``, with this port's output keys."""

    def __init__(self, body: nn.Module, neck: nn.Module, head: nn.Module, rng=None) -> None:
        super().__init__()
        self.net = Trunk(body, neck)
        self.head = head
        if rng is not None:
            self.rng = rng

    def execute(self, x: jt.Var, targets: list | None = None) -> dict:
        return _to_port(self.head(self.net(x), targets))


class Criterion:
    """The official criterion on this port's outputs."""

    def __init__(self, variant: str, num_classes: int) -> None:
        self.inner = jittor_impl.build_criterion(variant, num_classes)

    def __call__(self, outputs: dict, targets: list) -> dict:
        return self.inner(_to_official(outputs), targets)


class PostProcessor:
    """The official postprocessor on this port's outputs and ``(h, w)`` original sizes."""

    def __init__(self, variant: str, num_classes: int) -> None:
        self.inner = jittor_impl.build_postprocessor(variant, num_classes)

    def __call__(self, outputs: dict, sizes_hw: jt.Var) -> list:
        return self.inner(_to_official(outputs), sizes_hw[:, ::-1])


OPTIONS = {"output_keys": {"pred_logits": "logits", "pred_boxes": "boxes"},
           "box_format": "xyxy", "orig_size_order": "hw"}


def relayout(official: nn.Module) -> Detector:
    """jittor_impl's model, its modules and tensors moved into this port's layout."""
    model = Detector(official.backbone, official.encoder, official.decoder, official.rng)
    _relayout(model)
    return model


def _detector(variant: str, num_classes: int, size, seed: int) -> Detector:
    return relayout(jittor_impl.build_port(variant, num_classes, size=size, seed=seed)["model"])


def build_renamed(variant: str, num_classes: int, size=None, seed: int = 0) -> dict:
    """A correct port with its own names: model, criterion, postprocessor, output options."""
    return {"model": _detector(variant, num_classes, size, seed),
            "criterion": Criterion(variant, num_classes),
            "postprocessor": PostProcessor(variant, num_classes), "options": OPTIONS}


def build_buggy(variant: str, num_classes: int, size=None, seed: int = 0) -> dict:
    """:func:`build_renamed` with ReLU in the encoder's first lateral convolution."""
    parts = build_renamed(variant, num_classes, size, seed)
    lateral = parts["model"].net.neck.laterals[0]
    assert isinstance(lateral, ConvNormLayer)
    lateral.f = nn.ReLU()
    return parts


class _Detached(nn.Module):
    """An activation whose output is cut from the graph: the forward is unchanged."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.inner = act

    def execute(self, x: jt.Var) -> jt.Var:
        return self.inner(x).detach()


def build_detached(variant: str, num_classes: int, size=None, seed: int = 0) -> dict:
    """:func:`build_renamed` with the encoder's first lateral convolution cut from the graph
    (a stray ``detach``): same outputs, no gradient reaches the backbone through it."""
    parts = build_renamed(variant, num_classes, size, seed)
    lateral = parts["model"].net.neck.laterals[0]
    lateral.f = _Detached(lateral.f)
    return parts


class EvalOnly(nn.Module):
    """The official module names, an eval forward, nothing for training."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.decoder = model.decoder
        self.encoder = model.encoder

    def execute(self, x: jt.Var) -> dict:
        return self.decoder(self.encoder(self.backbone(x)))


def build_eval_only(variant: str, num_classes: int, size=None) -> nn.Module:
    """Only the model, which runs in eval mode."""
    return EvalOnly(jittor_impl.build_port(variant, num_classes, size=size)["model"])


def build_raising(variant: str, num_classes: int) -> nn.Module:
    """Fails as a half-written port does."""
    raise NotImplementedError(f"variant {variant} is not ported yet")
