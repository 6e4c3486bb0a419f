#!/usr/bin/env bash
# Set up (once) and run on a fresh machine: `bash scripts/run.sh demo`, `bash scripts/run.sh generate ...` or
# `bash scripts/run.sh test`.
# Creates .venv in the repository with the CPU build of torch 2.13.0 pinned first, so that nothing below can
# pull a CUDA build of torch; on a GPU machine with torch already installed, use your own environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.dualparal-stamp
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$VPY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    # k-diffusion is only the reference implementation of dpmpp_2m in the tests; its own requirements
    # (torchvision, wandb, clip, ...) are not needed and would replace torch, so install it alone.
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps "k-diffusion==0.1.1.post1"
    "$VPY" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
        || { echo "a CUDA build of torch was installed; expected the CPU build of 2.13.0" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
case "${1:-}" in
    demo) shift; exec "$VPY" -m dualparal_core demo "$@" ;;
    generate) shift; exec "$VPY" -m dualparal_core generate "$@" ;;
    tiny-files) shift; exec "$VPY" -m dualparal_core.testing "$@" ;;
    test) shift; exec "$VPY" -m pytest -q "$@" ;;
    *) echo "usage: bash scripts/run.sh demo|generate|tiny-files|test [args]" >&2; exit 2 ;;
esac
