#!/usr/bin/env bash
# One prepared GPU check: run it as soon as a GPU machine (one H100/H200) is lent. It finishes
# in under 7 minutes on a cold machine (400 s budget, hard stop at 405 s), prints one markdown
# report that opens with which sections finished, and writes report.md, report.json and
# sections.log to $OUT if set (the device tool's output folder), else to ./gpu-check-out/.
# Phases, time boxes and what each section measures: bench/gpu_check.py's docstring
# (`python bench/gpu_check.py --plan` prints the boxes).
#
#   bash bench/gpu_check.sh                  # everything
#   bash bench/gpu_check.sh --sections a,c   # some sections (any gpu_check.py option passes through)
#   bash bench/gpu_check.sh --fetch-wheels   # HERE, not on the GPU machine: see "Packages" below
#
# Python. Nothing is downloaded at run time. The first of these that imports torch is used:
#   1. $FOCA_PY, if set;
#   2. ./.venv/bin/python (the README's venv), if present;
#   3. python3 on the PATH, if it has torch (the device machine's image: torch + triton with
#      CUDA, pytest, pytest-benchmark; no diffusers, no cache-dit, no network);
#   4. otherwise a venv is made with the README's install command (python3 -m venv --clear .venv,
#      pip install torch==2.13.0 triton==3.8.0, pip install -e ".[test,diffusers]"). That needs
#      a package index; where there is none it fails within seconds and the script says so.
# The repository is put on PYTHONPATH, so foca_kernels need not be installed.
#
# Packages the image lacks (sections b, d, e, i need diffusers; e, i use cache-dit if present) travel
# as wheels in ./.whl: on a machine with a package index run `bash bench/gpu_check.sh
# --fetch-wheels` (downloads diffusers 0.42.1 and cache-dit 1.5.3, pure-Python wheels, no
# dependencies: the image has the rest), add `.whl/` to .git/info/exclude, and name `.whl` in
# the device tool's `carry`. They are installed here with pip --no-index into a temporary
# folder, never from the network. Without them b, d, e report "skipped: diffusers is not
# installed" and the rest runs (section w then warms sections a, c and h only).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS=(diffusers==0.42.1 cache-dit==1.5.3)

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
fi

OUT_DIR=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT_DIR"
say() { echo "[gpu_check.sh] $*" >&2; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }

PY=""
if [ -n "${FOCA_PY:-}" ]; then
    PY=$FOCA_PY
elif [ -x .venv/bin/python ] && has_torch .venv/bin/python; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null && has_torch python3; then
    PY=python3
    say "no usable .venv: using $(command -v python3) (it has torch); nothing installed"
else
    say "no Python with torch: making .venv with the README's install command (needs a package index)"
    if python3 -m venv --clear .venv \
        && .venv/bin/pip install --retries 0 --timeout 15 torch==2.13.0 triton==3.8.0 \
        && .venv/bin/pip install --retries 0 --timeout 15 -e ".[test,diffusers]"; then
        PY=.venv/bin/python
    else
        say "FAILED to make the venv (no package index reachable?). Run where torch is installed, or set FOCA_PY=/path/to/python."
        echo "# GPU check: not run" > "$OUT_DIR/report.md"
        echo "No Python with torch, and the README's install command failed (no package index?)." >> "$OUT_DIR/report.md"
        cat "$OUT_DIR/report.md"
        exit 2
    fi
fi
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1 | tail -1))"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$SITE"  # only these packages (--no-deps): the image's own stay as they are
        say "installed from .whl (no network): $(ls .whl | tr '\n' ' ')"
    else
        say "could not install the wheels in .whl; going on without them"
    fi
fi
# The compiled kernels, never the interpreter: tests/conftest.py switches the interpreter on when
# TRITON_INTERPRET is unset, and the benchmarks refuse it on CUDA. gpu_check.py sets it for
# every child as well.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1

# gpu_check.py keeps itself to its --budget (400 s by default); this is the hard stop.
timeout -k 5 405 "$PY" bench/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "stopped at the 405 s hard limit; report.md has the sections that had finished"
fi
exit $rc
