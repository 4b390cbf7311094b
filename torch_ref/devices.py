"""The device PyTorch computes on: ``cpu`` or ``cuda`` (see :mod:`rtdetr_common.devices`).

On CUDA, deterministic algorithms need cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``),
set here before CUDA starts unless the user set it. A process of a ``torchrun`` job takes the
CUDA device of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch

from rtdetr_common.devices import require


def available() -> tuple[bool, str]:
    """Whether torch can use CUDA, and what it found, in words."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return False, ("torch.cuda.is_available() is False; this torch is a CPU build" if build is None
                       else f"torch.cuda.is_available() is False (a CUDA {build} build, no usable device)")
    return True, f"{torch.cuda.device_count()} CUDA devices"


def use(name: str) -> torch.device:
    """The torch device for ``name`` (``cuda``: this process's, made current).

    Raises:
        DeviceUnavailableError: If ``name`` is ``cuda`` and torch has no CUDA device.
    """
    ok, found = available() if name == "cuda" else (True, "")
    require(name, "torch", ok, found)
    if name == "cpu":
        return torch.device("cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def name_of(device: torch.device) -> str:
    """The neutral name (``cpu`` / ``cuda``) of a torch device."""
    return device.type
