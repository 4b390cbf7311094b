"""Jittor port of RT-DETR, mirrored file for file with torch_ref.

``from jittor_impl import build_model``; ``build_model("r50vd", num_classes=80)``.
Importing the package prepares Jittor to run offline (:mod:`jittor_impl._env`): import it before ``jittor``."""

from importlib import import_module

from ._env import prepare_jittor_env

prepare_jittor_env()

_PUBLIC = {
    "build_model": "build",
    "build_matcher": "build",
    "build_criterion": "build",
    "build_postprocessor": "build",
    "build_optimizer": "build",
    "build_ema": "build",
    "build_port": "build",
    "load_checkpoint": "checkpoint",
    "load_state_dict_strict": "checkpoint",
    "read_checkpoint": "checkpoint",
}

__all__ = ["prepare_jittor_env", *_PUBLIC]


def __getattr__(name: str):
    """Imports a public builder or loader on first access (PEP 562): ``import jittor_impl`` stays cheap."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jittor_impl' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
