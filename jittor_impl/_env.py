"""Prepares the process environment so that Jittor 1.3.11 imports and runs offline.

Two things stop a stock ``import jittor`` on the target machine (see
``shared/reference/ENVIRONMENT.md``):

* The machine has ``nvcc`` (a wrapper script in ``/usr/local/bin``) but no GPU and no
  CUDA driver. Jittor then takes CUDA to be present and crashes in ``check_cuda``
  while opening ``libcudart.so``. Setting the environment variable ``nvcc_path`` to the
  empty string makes Jittor run on the CPU.
* On first use Jittor downloads oneDNN (``dnnl_lnx_2.2.0_cpu_gomp.tgz``) unless
  ``<jittor home>/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp/lib/libmkldnn.so`` exists.
  Debian's ``libdnnl-dev`` (oneDNN 2.6, API-compatible for Jittor's ops) can stand in
  for it through a directory of symbolic links.

A third thing wastes minutes: Jittor names its compiled-kernel cache after the git branch
of the folder it is installed in (the project's ``.venv``), so a new branch or the first
commit means a cold rebuild of its core. Pinning ``cache_name`` avoids that.

:func:`prepare_jittor_env` handles all three and must run before the first ``import jittor``.
It never lets Jittor try a download: when neither the oneDNN layout nor Debian's
library exists, it raises and points at ``scripts/setup.sh``.

Opt-in precise kernels (``RTDETR_JITTOR_PRECISE=1``)
----------------------------------------------------

Jittor compiles its CPU kernels with ``-Ofast``: fast-math (reassociation, reciprocal
division, finite-only math) and, through GCC 12's ``crtfastmath.o`` linked into every
kernel library, flush-to-zero and denormals-are-zero switched on for the loading thread,
so for torch and NumPy in the same process too. With the environment variable
``RTDETR_JITTOR_PRECISE=1`` set before ``jittor_impl`` is imported, the kernels are
compiled with ``-O3`` and no fast-math instead (Jittor adds ``-Ofast`` only when its
``cc_flags`` environment variable names no ``-O`` level). They go to a cache of their own,
``<cache_name>_precise`` (``default_precise`` by default): Jittor's cache key holds the
compile command, but a kernel's file name does not, so a cache shared by both flag sets
would rebuild and overwrite its kernels at every switch. ``0`` or no value keeps Jittor's
``-Ofast``, the default.

The first precise run builds Jittor's core and every kernel it needs (about ten minutes
on two busy cores). Measured on this machine (2 cores, fp32, seeded weights): r50vd_m's
train-mode ``loss_vfl`` at 640 is off the float64 reference by 6.4e-4 relative instead of
1.48e-3 (torch: 2.6e-4); an r18vd eval forward at 640 costs 5-8% more CPU time and a
train step 0.5-1.5% more.
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

# Environment variable that asks for kernels compiled without fast-math.
PRECISE_ENV = "RTDETR_JITTOR_PRECISE"
# Suffix of the kernel cache that precise kernels use.
_PRECISE_SUFFIX = "_precise"
# Optimisation level given to Jittor instead of its -Ofast (GCC 12: -Ofast is -O3 plus
# -ffast-math, -fallow-store-data-races and -fno-semantic-interposition).
_PRECISE_OPT_LEVEL = "-O3"
# Compiler options that switch fast-math on.
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
    """Opens a shared library by name.

    Args:
        name: The library's file name or path, as ``dlopen`` takes it.

    Returns:
        The loaded library, or ``None`` when it cannot be opened.
    """
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _cuda_runtime_loadable() -> bool:
    """Tells whether a CUDA runtime library (``libcudart``) can be opened.

    Returns:
        ``True`` when ``ctypes.util.find_library('cudart')`` finds one that loads, or
        one of the usual ``libcudart.so`` names loads.
    """
    found = ctypes.util.find_library("cudart")
    if found and _loadable(found) is not None:
        return True
    return any(_loadable(name) is not None for name in _CUDART_NAMES)


def _cuda_device_present() -> bool:
    """Tells whether the CUDA driver loads and reports at least one device.

    A CUDA toolkit can be installed (runtime library included) on a machine with no GPU,
    as on the target machine, so the runtime alone does not show that CUDA works.

    Returns:
        ``True`` when ``libcuda.so.1`` loads, ``cuInit`` succeeds and
        ``cuDeviceGetCount`` reports one device or more.
    """
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
    """Tells whether Jittor may use CUDA in this process.

    Returns:
        ``True`` when a CUDA driver with a device and a CUDA runtime library are both
        present.
    """
    # The driver test first: on a CPU machine it fails at once, without the
    # subprocess that find_library starts.
    return _cuda_device_present() and _cuda_runtime_loadable()


def jittor_home() -> Path:
    """Returns the directory under which Jittor keeps ``.cache/jittor``.

    Mirrors ``jittor_utils.home()`` of Jittor 1.3.11 without writing anything: the
    environment variable ``JITTOR_HOME`` wins, then ``JITTOR_HOME`` in
    ``~/.cache/jittor/config.json``, then the user's home directory. (Jittor has no
    ``cache_path`` environment variable; its compiled-kernel cache and its oneDNN
    directory both sit under this home.)

    Returns:
        The absolute path of Jittor's home directory.
    """
    default = str(Path.home())
    config = Path.home() / ".cache" / "jittor" / "config.json"
    try:
        with open(config, encoding="utf-8") as f:
            default = json.load(f).get("JITTOR_HOME", default)
    except (OSError, ValueError, AttributeError):
        pass
    return Path(os.path.abspath(os.environ.get("JITTOR_HOME", default)))


def dnnl_dir() -> Path:
    """Returns the oneDNN directory whose ``lib/libmkldnn.so`` Jittor looks for.

    Returns:
        ``<jittor home>/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp`` (with an
        ``_aarch64`` suffix on ARM, as in Jittor's ``install_mkl``).
    """
    name = "dnnl_lnx_2.2.0_cpu_gomp"
    if platform.machine() == "aarch64":
        name += "_aarch64"
    return jittor_home() / ".cache" / "jittor" / "mkl" / name


def _layout_ok(root: Path) -> bool:
    """Tells whether a oneDNN directory is complete.

    Args:
        root: The directory to test.

    Returns:
        ``True`` when ``lib/libmkldnn.so`` resolves to a file (the test Jittor makes
        before downloading) and ``include/dnnl.hpp`` resolves to a file.
    """
    return (root / "lib" / "libmkldnn.so").is_file() and (root / "include" / "dnnl.hpp").is_file()


def _system_dnnl() -> tuple[Path, list[Path]] | None:
    """Finds the oneDNN library and headers that Debian's ``libdnnl-dev`` installs.

    Returns:
        The shared library (``libdnnl.so.2``) and the header paths to link
        (``/usr/include/dnnl*.h*`` and ``/usr/include/oneapi``), or ``None`` when
        either is missing.
    """
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
    """Creates the oneDNN directory of links in one atomic step.

    The links are made in a hidden temporary directory beside ``target`` (its name
    does not start with ``dnnl``, so Jittor never takes it for the oneDNN directory),
    which is then renamed to ``target``. An existing but incomplete ``target`` is
    moved aside first and removed afterwards, so no reader ever sees half a layout.

    Args:
        target: The oneDNN directory Jittor looks in.
        library: The shared library ``lib/libmkldnn.so`` will point at.
        headers: The header files and folders ``include/`` will hold links to.
    """
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
    """Makes sure Jittor finds oneDNN on disk and so never starts its download.

    Raises:
        RuntimeError: When neither a complete oneDNN directory nor Debian's
            ``libdnnl-dev`` exists.
    """
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
    """Tells whether ``RTDETR_JITTOR_PRECISE`` asks for kernels without fast-math.

    Returns:
        ``True`` when the variable is ``"1"``; ``False`` when it is ``"0"``, empty or unset.

    Raises:
        ValueError: When the variable holds any other value.
    """
    value = os.environ.get(PRECISE_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(
            f"{PRECISE_ENV}={value!r}: use 1 (Jittor kernels without fast-math) or 0 / unset "
            f"(Jittor's -Ofast kernels)."
        )
    return value == "1"


def _request_precise_kernels() -> None:
    """Points Jittor at kernels without fast-math, compiled into a cache of their own.

    Appends ``-O3`` to the environment variable ``cc_flags`` unless it already names an
    ``-O`` level (either way Jittor then adds no ``-Ofast``), and appends ``_precise`` to
    ``cache_name`` unless it already ends with it. Both steps keep a child process that
    inherits the environment in the same cache.

    Raises:
        RuntimeError: When ``cc_flags`` itself asks for fast-math.
    """
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
    """Prepares this process so that ``import jittor`` works offline on the CPU.

    Call it before Jittor is first imported; afterwards it does nothing. It:

    * sets the environment variable ``cache_name`` to ``"default"`` unless the user
      set it, so that Jittor's compiled kernels do not depend on the git branch.
    * sets the environment variable ``nvcc_path`` to ``""`` when CUDA is unusable (no
      driver with a device, or no runtime library), so that Jittor runs on the CPU.
      A value the user has set is kept, and a machine with a working GPU keeps CUDA.
    * makes sure ``<jittor home>/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp`` exists,
      building it from Debian's ``libdnnl-dev`` when it does not (skipped when the user
      has set ``use_mkl=0``, where Jittor does not use oneDNN).
    * with ``RTDETR_JITTOR_PRECISE=1``, makes Jittor compile its kernels with ``-O3``
      instead of ``-Ofast`` into the cache ``<cache_name>_precise`` (see the module
      docstring).

    It is idempotent and safe to call from several processes at once.

    Raises:
        RuntimeError: When oneDNN is missing and cannot be provided from the system; when
            precise kernels are asked for but Jittor was already imported with
            ``-Ofast``, or ``cc_flags`` asks for fast-math.
        ValueError: When ``RTDETR_JITTOR_PRECISE`` is not ``0``, ``1`` or empty.
    """
    precise = precise_kernels_requested()
    if "jittor" in sys.modules:
        kernel_flags = getattr(getattr(sys.modules["jittor"], "flags", None), "cc_flags", "")
        if precise and any(o in kernel_flags.split() for o in _FAST_MATH_OPTIONS):
            raise RuntimeError(
                f"{PRECISE_ENV}=1 came too late: this process imported Jittor with "
                f"fast-math kernels. Set it before the first import of jittor_impl or jittor."
            )
        return
    # Jittor names its kernel cache after the git branch of the folder it is installed
    # in (here the project's .venv, so the project's branch). A fixed name keeps one
    # cache, the one scripts/setup.sh warmed, across branches and commits.
    os.environ.setdefault("cache_name", "default")
    if precise:
        _request_precise_kernels()
    if "nvcc_path" not in os.environ and not cuda_available():
        os.environ["nvcc_path"] = ""
    if os.environ.get("use_mkl", "1") == "1":
        _ensure_dnnl()
