#!/usr/bin/env bash
# One-shot set-up of a fresh machine (Debian 12, Python 3.11, no GPU, only PyPI and Debian
# reachable) so that both PyTorch and Jittor run:
#   1. Debian packages: libdnnl-dev (oneDNN for Jittor, which would otherwise download it),
#      g++ and python3.X-dev (Jittor compiles its kernels against Python's headers).
#      chromium (headless; the report test renders report.html in it), and OpenMPI
#      (openmpi-bin for mpirun, libopenmpi-dev for the mpicc that Jittor builds its MPI with).
#   2. A virtual environment in .venv at the repository root.
#   3. The project and its pinned dependencies: pip install -e '.[dev]'.
#   4. A check that torch is the CPU build 2.13.0+cpu (never a multi-GB CUDA build).
#   5. Jittor's cold compile (core, oneDNN ops, a conv, a matmul and a backward pass),
#      so that it happens here and not inside the first test. On a fresh install it starts as
#      soon as Jittor and the packages it imports are in (pinned as in pyproject.toml) and runs
#      beside the rest of step 3.
# Idempotent: steps whose result is already there are skipped by cheap checks (step 3 by a
# stamp keyed on pyproject.toml's hash and the package folders, which an editable install maps). Re-run it after changing pyproject.toml.
# Environment: PYTHON picks the interpreter for a new .venv (default: python3.11, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.rtdetr-parity-setup"
TORCH_WANTED="2.13.0+cpu"
LOG="$(mktemp "${TMPDIR:-/tmp}/rtdetr-parity-setup.XXXXXX.log")"
STEP=""

say() { printf '[setup] %s\n' "$*"; }
on_error() {
    local rc=$?
    say "FAILED during: $STEP (exit $rc). Last lines of $LOG:"
    tail -n 40 "$LOG" >&2 || true
    [[ -n "${WARM_PID:-}" ]] && kill "$WARM_PID" 2>/dev/null
    exit "$rc"
}
trap on_error ERR

# --- 1. Debian packages --------------------------------------------------------------------
STEP="1/5 Debian packages"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    PY="python3.11"
else
    PY="python3"
fi
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
need=()
for pkg in libdnnl-dev g++ "python${PYVER}-dev" "python${PYVER}-venv" chromium openmpi-bin libopenmpi-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    SUDO=""
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { say "need root (or sudo) to install: ${need[*]}"; exit 1; }
        SUDO="sudo"
    fi
    say "$STEP: installing ${need[*]}"
    $SUDO apt-get update -qq >>"$LOG" 2>&1
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$LOG" 2>&1
else
    say "$STEP: already installed"
fi

# --- 2. Virtual environment ----------------------------------------------------------------
STEP="2/5 virtual environment"
if [[ -x "$VPY" ]] && "$VPY" -c 'import sys' >/dev/null 2>&1; then
    say "$STEP: $VENV exists ($("$VPY" -V 2>&1))"
else
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" >>"$LOG" 2>&1
    say "$STEP: created $VENV with $("$VPY" -V 2>&1)"
fi

# Step 5's compile, in the background: a small conv, matmul and backward pass through Jittor
# (the repository on PYTHONPATH: jittor_impl prepares Jittor before the project is installed).
WARM_LOG="$LOG.warmup"
WARM_PID=""
WARM_START=0
start_warmup() {
    WARM_START=$SECONDS
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VPY" - >"$WARM_LOG" 2>&1 <<'EOF' &
import jittor_impl  # noqa: F401  (prepares nvcc_path and oneDNN before jittor loads)
import jittor as jt
from jittor import compile_extern, nn

assert compile_extern.mkl_ops is not None, "Jittor did not load its oneDNN ops"
jt.set_global_seed(0)
conv = nn.Conv2d(3, 8, 3, padding=1)
x = jt.randn(2, 3, 16, 16)
w = jt.randn(8 * 16 * 16, 4)
y = nn.relu(conv(x)).reshape(2, -1)
loss = jt.matmul(y, w).sqr().mean()
gw, gx = jt.grad(loss, [conv.weight, x])
gw.sync(), gx.sync()
assert gw.shape == conv.weight.shape and gx.shape == x.shape
print(f"WARMUP_OK use_cuda={jt.flags.use_cuda} loss={loss.item():.4f} |gw|={gw.abs().sum().item():.4f}")
EOF
    WARM_PID=$!
}

# --- 3. Python packages --------------------------------------------------------------------
STEP="3/5 Python packages"
KEY="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$VPY" -V 2>&1) $(echo */__init__.py)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    say "$STEP: up to date with pyproject.toml"
else
    rm -f "$STAMP"
    say "$STEP: pip install -e '.[dev]' (pinned; torch from the local CPU wheel)"
    "$VPY" -m pip install -q --upgrade pip >>"$LOG" 2>&1
    # Jittor first, with the packages it imports at their pinned versions, so that step 5's
    # compile can run while the rest installs (nothing installed after this replaces them).
    jittor_pins="$(grep -oE '"(jittor|numpy|pillow|tqdm)==[^"]+"' pyproject.toml | tr -d '"' | tr '\n' ' ')"
    [[ "$(wc -w <<<"$jittor_pins")" -eq 4 ]] || { say "$STEP: pyproject.toml does not pin jittor, numpy, pillow and tqdm"; false; }
    # shellcheck disable=SC2086  # one argument per pinned requirement
    "$VPY" -m pip install -q --no-compile $jittor_pins >>"$LOG" 2>&1
    start_warmup
    "$VPY" -m pip install -q --no-compile -e '.[dev]' >>"$LOG" 2>&1
    "$VPY" -m pip check >>"$LOG" 2>&1 || say "$STEP: note: pip check reports conflicts (see $LOG)"
fi

# --- 4. torch must be the CPU build --------------------------------------------------------
STEP="4/5 torch build check"
frozen="$("$VPY" -m pip list --format=freeze 2>/dev/null)"
torch_ver="$(sed -n 's/^torch==//p' <<<"$frozen")"
if [[ "$torch_ver" != "$TORCH_WANTED" ]]; then
    say "$STEP: expected torch $TORCH_WANTED, found '${torch_ver:-none}'"
    exit 1
fi
if grep -qi '^nvidia-' <<<"$frozen"; then
    say "$STEP: CUDA packages (nvidia-*) are installed; something pulled a CUDA torch"
    exit 1
fi
say "$STEP: torch $torch_ver"
[[ -f "$STAMP" ]] || printf '%s' "$KEY" >"$STAMP"

# --- 5. Jittor warm-up ---------------------------------------------------------------------
STEP="5/5 Jittor warm-up"
if [[ -n "$WARM_PID" ]]; then
    say "$STEP: Jittor's kernels, compiling since step 3 (minutes the first time)"
else
    say "$STEP: importing Jittor and compiling its kernels (minutes the first time)"
    start_warmup
fi
wait "$WARM_PID" || { cat "$WARM_LOG" >>"$LOG"; false; }
WARM_PID=""
cat "$WARM_LOG" >>"$LOG"
rm -f "$WARM_LOG"
result="$(grep -a '^WARMUP_OK' "$LOG" | tail -n 1)"
say "$STEP: ${result#WARMUP_OK } ($((SECONDS - WARM_START)) s since it started)"
rm -f "$LOG"
say "done: activate with 'source .venv/bin/activate'"
