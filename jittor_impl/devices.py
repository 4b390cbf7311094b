"""The device Jittor computes on: ``cpu`` or ``cuda`` (see :mod:`rtdetr_common.devices`).

Differences from torch_ref/devices.py:
- Jittor has one process-wide switch, ``jt.flags.use_cuda``, not a device per tensor: :func:`use` sets it and returns the name. Under ``mpirun`` Jittor gives each process its own GPU itself.
- CUDA needs a driver with a device, a runtime library and Jittor's CUDA compiler (``jt.has_cuda``); the port's CPU kernels step aside for Jittor's ops there (``jittor_impl.kernels.OPERATORS``).
- No cuBLAS workspace setting: Jittor has no deterministic-algorithms switch.
"""

from __future__ import annotations

import jittor as jt

from rtdetr_common.devices import require

from ._env import cuda_available


def available() -> tuple[bool, str]:
    """Whether Jittor can use CUDA, and what it found, in words."""
    if not cuda_available():
        return False, "no CUDA driver with a device, or no CUDA runtime library"
    if not jt.has_cuda:
        return False, "Jittor found no CUDA compiler (nvcc) at start"
    return True, "a CUDA device and Jittor's CUDA compiler"


def use(name: str) -> str:
    """Switches Jittor to ``name`` for everything computed from here on; returns it.

    Raises:
        DeviceUnavailableError: If ``name`` is ``cuda`` and Jittor cannot use CUDA.
    """
    ok, found = available() if name == "cuda" else (True, "")
    require(name, "Jittor", ok, found)
    jt.flags.use_cuda = 1 if name == "cuda" else 0
    return name


def name_of(device: str) -> str:
    """The neutral name (``cpu`` / ``cuda``) of a device :func:`use` returned."""
    return device
