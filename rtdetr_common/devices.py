"""Compute devices the trainers and the parity checks run on, by name (framework-neutral).

``cpu`` is every framework's default. ``cuda`` is torch's CUDA device (``cuda:<local rank>`` in
a run of several processes) and Jittor's ``jt.flags.use_cuda``; each framework's module says
whether it has one (``torch_ref.devices`` / ``jittor_impl.devices``). Asking for a device a
framework lacks is an error that names the framework and what it found, never a silent
fallback to the CPU.
"""

from __future__ import annotations

DEVICES = ("cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that the framework cannot use on this machine."""


def check_device(name: str) -> str:
    """``name`` if it is a known device name.

    Raises:
        ValueError: Naming the known ones otherwise.
    """
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return name


def require(name: str, framework: str, available: bool, found: str) -> str:
    """``name`` when ``framework`` can use it (``available``); ``found`` says what it saw.

    Raises:
        ValueError: For an unknown device name.
        DeviceUnavailableError: For ``cuda`` where the framework has none.
    """
    check_device(name)
    if name == "cuda" and not available:
        raise DeviceUnavailableError(f"--device cuda: {framework} cannot use CUDA here ({found}); "
                                     f"run with --device cpu")
    return name
