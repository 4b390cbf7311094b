"""Prepares the process so that Jittor 1.3.11 imports and runs offline, on the CPU unless CUDA is usable.

:func:`prepare_jittor_env` must run before the first ``import jittor``. It empties ``nvcc_path`` when a CUDA
toolkit is installed without a usable GPU (Jittor would crash opening ``libcudart.so``), provides oneDNN from
Debian's ``libdnnl-dev`` as a directory of links (Jittor would download it; instead this raises), and pins
``cache_name`` (Jittor names its kernel cache after the git branch: a new branch would rebuild its core).
With ``RTDETR_JITTOR_PRECISE=1`` set before ``jittor_impl`` is imported, Jittor's kernels are compiled with
``-O3`` instead of its fast-math ``-Ofast`` (which also turns flush-to-zero on for the whole process) into the
cache ``<cache_name>_precise``.

Jittor's fused CPU kernels and reductions run on one thread; this is why the port carries its own OpenMP
kernels (:mod:`jittor_impl._kernels`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = [
    "prepare_jittor_env",
    "precise_kernels_requested",
    "cuda_available",
    "jittor_home",
    "dnnl_dir",
    "PRECISE_ENV",
]

_SETUP_HINT = "Run `bash scripts/setup.sh` from the repository root to prepare this machine."

PRECISE_ENV = "RTDETR_JITTOR_PRECISE"
_PRECISE_SUFFIX = "_precise"
# Replaces Jittor's -Ofast (GCC 12: -O3, -ffast-math, -fallow-store-data-races, -fno-semantic-interposition).
_PRECISE_OPT_LEVEL = "-O3"
_FAST_MATH_OPTIONS = ("-Ofast", "-ffast-math")

# Runtime-library names tried with ctypes.CDLL, newest first.
_CUDART_NAMES = (
    "libcudart.so",
    "libcudart.so.13",
    "libcudart.so.12",
    "libcudart.so.11.0",
    "libcudart.so.10.2",
)


def _loadable(name: str) -> ctypes.CDLL | None:
    """The shared library ``name`` opened with ``ctypes.CDLL``, or ``None`` when it cannot be opened."""
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _cuda_runtime_loadable() -> bool:
    """Whether a CUDA runtime library (``libcudart``) loads."""
    found = ctypes.util.find_library("cudart")
    if found and _loadable(found) is not None:
        return True
    return any(_loadable(name) is not None for name in _CUDART_NAMES)


def _cuda_device_present() -> bool:
    """Whether the CUDA driver loads and reports a device (a toolkit, runtime included, may be installed
    without a GPU)."""
    driver = _loadable("libcuda.so.1") or _loadable("libcuda.so")
    if driver is None:
        return False
    try:
        if driver.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except AttributeError:
        return False


def cuda_available() -> bool:
    """Whether Jittor may use CUDA: a driver with a device and a runtime library are both present."""
    # The driver test first: on a CPU machine it fails at once, without find_library's subprocess.
    return _cuda_device_present() and _cuda_runtime_loadable()


def jittor_home() -> Path:
    """Jittor's home, the parent of ``.cache/jittor``, found as ``jittor_utils.home()`` finds it but writing nothing.

    ``JITTOR_HOME`` in the environment wins, then ``JITTOR_HOME`` in ``~/.cache/jittor/config.json``, then the
    user's home directory."""
    default = str(Path.home())
    config = Path.home() / ".cache" / "jittor" / "config.json"
    try:
        with open(config, encoding="utf-8") as f:
            default = json.load(f).get("JITTOR_HOME", default)
    except (OSError, ValueError, AttributeError):
        pass
    return Path(os.path.abspath(os.environ.get("JITTOR_HOME", default)))


def dnnl_dir() -> Path:
    """``<jittor home>/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp`` (``_aarch64`` appended on ARM), where Jittor
    looks for ``lib/libmkldnn.so``."""
    name = "dnnl_lnx_2.2.0_cpu_gomp"
    if platform.machine() == "aarch64":
        name += "_aarch64"
    return jittor_home() / ".cache" / "jittor" / "mkl" / name


def _layout_ok(root: Path) -> bool:
    """Whether ``root`` holds ``lib/libmkldnn.so`` (Jittor's test before downloading) and ``include/dnnl.hpp``."""
    return (root / "lib" / "libmkldnn.so").is_file() and (root / "include" / "dnnl.hpp").is_file()


def _system_dnnl() -> tuple[Path, list[Path]] | None:
    """``libdnnl.so.2`` and the header paths of Debian's ``libdnnl-dev``, or ``None`` when either is missing."""
    lib_dirs = []
    multiarch = getattr(sys.implementation, "_multiarch", None)
    if multiarch:
        lib_dirs.append(f"/usr/lib/{multiarch}")
    lib_dirs += ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib"]
    library = next(
        (Path(d) / "libdnnl.so.2" for d in lib_dirs if (Path(d) / "libdnnl.so.2").is_file()), None
    )
    include = Path("/usr/include")
    headers = [Path(p) for p in sorted(glob.glob(str(include / "dnnl*.h*")))]
    if (include / "oneapi").is_dir():
        headers.append(include / "oneapi")
    if library is None or not (include / "dnnl.hpp").is_file():
        return None
    return library, headers


def _build_layout(target: Path, library: Path, headers: list[Path]) -> None:
    """Creates the oneDNN directory of links at ``target`` in one atomic step.

    The links go into a hidden temporary directory beside it (not named ``dnnl*``, so Jittor never takes it for
    the layout) that is renamed to ``target``; an incomplete ``target`` is moved aside first."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-onednn-", dir=parent))
    try:
        (tmp / "include").mkdir()
        (tmp / "lib").mkdir()
        for header in headers:
            os.symlink(header, tmp / "include" / header.name)
        os.symlink(library, tmp / "lib" / "libmkldnn.so")
        os.chmod(tmp, 0o755)
        stale = None
        if os.path.lexists(target):
            stale = Path(tempfile.mkdtemp(prefix=".stale-onednn-", dir=parent))
            os.replace(target, stale / "old")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process put a layout in place meanwhile; keep it if it is whole.
            if not _layout_ok(target):
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_dnnl() -> None:
    """Makes sure Jittor finds oneDNN on disk; RuntimeError when neither it nor ``libdnnl-dev`` exists."""
    target = dnnl_dir()
    if _layout_ok(target):
        return
    found = _system_dnnl()
    if found is None:
        raise RuntimeError(
            f"Jittor needs oneDNN at {target} and would try to download it; Debian's "
            f"libdnnl-dev (libdnnl.so.2 and /usr/include/dnnl.hpp) is not installed either. "
            + _SETUP_HINT
        )
    _build_layout(target, *found)
    if not _layout_ok(target):
        raise RuntimeError(f"Could not build the oneDNN directory {target}. " + _SETUP_HINT)


def precise_kernels_requested() -> bool:
    """Whether ``RTDETR_JITTOR_PRECISE`` is ``1`` (``0``, empty or unset: no; other values: ValueError)."""
    value = os.environ.get(PRECISE_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(
            f"{PRECISE_ENV}={value!r}: use 1 (Jittor kernels without fast-math) or 0 / unset "
            f"(Jittor's -Ofast kernels)."
        )
    return value == "1"


def _request_precise_kernels() -> None:
    """Appends ``-O3`` to ``cc_flags`` (unless it names an ``-O`` level) and ``_precise`` to ``cache_name``.

    Both live in the environment, so child processes use the same cache. RuntimeError when ``cc_flags`` asks
    for fast-math."""
    options = os.environ.get("cc_flags", "").split()
    fast = [o for o in options if o in _FAST_MATH_OPTIONS]
    if fast:
        raise RuntimeError(
            f"{PRECISE_ENV}=1 asks for kernels without fast-math, but the environment "
            f"variable cc_flags contains {' '.join(fast)}; remove it or unset {PRECISE_ENV}."
        )
    if not any(o.startswith("-O") for o in options):
        os.environ["cc_flags"] = " ".join([*options, _PRECISE_OPT_LEVEL])
    name = os.environ["cache_name"]
    if not name.endswith(_PRECISE_SUFFIX):
        os.environ["cache_name"] = name + _PRECISE_SUFFIX


def prepare_jittor_env() -> None:
    """Prepares this process for ``import jittor`` offline; idempotent, safe from several processes at once.

    Unless set by the user, it sets ``cache_name`` to ``default`` and, when CUDA is unusable, ``nvcc_path`` to
    ``""``; it provides the oneDNN directory (unless ``use_mkl=0``) and applies ``RTDETR_JITTOR_PRECISE``. Raises
    RuntimeError when oneDNN cannot be provided or precise kernels come too late or clash with ``cc_flags``,
    ValueError for a bad ``RTDETR_JITTOR_PRECISE``."""
    precise = precise_kernels_requested()
    if "jittor" in sys.modules:
        kernel_flags = getattr(getattr(sys.modules["jittor"], "flags", None), "cc_flags", "")
        if precise and any(o in kernel_flags.split() for o in _FAST_MATH_OPTIONS):
            raise RuntimeError(
                f"{PRECISE_ENV}=1 came too late: this process imported Jittor with "
                f"fast-math kernels. Set it before the first import of jittor_impl or jittor."
            )
        return
    # One kernel cache, the one scripts/setup.sh warmed, across branches and commits.
    os.environ.setdefault("cache_name", "default")
    if precise:
        _request_precise_kernels()
    if "nvcc_path" not in os.environ and not cuda_available():
        os.environ["nvcc_path"] = ""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:  # not launched by mpirun: no MPI to load
        os.environ.setdefault("use_mpi", "0")
    else:  # under mpirun Jittor needs its MPI, whatever a parent process left in use_mpi
        os.environ["use_mpi"] = "1"
    if os.environ.get("use_mkl", "1") == "1":
        _ensure_dnnl()
