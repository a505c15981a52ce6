#!/usr/bin/env bash
# Create the SEPARATE virtualenv used by benchmarks/bench_server.py to run Infinity (infinity-emb) side by
# side with `m2d serve`. Infinity pins an older transformers, so it must never go into the project's .venv.
#
#   bash benchmarks/infinity/setup.sh [VENV_DIR]      # default /work/bench-venvs/infinity
#
# What works (infinity-emb 0.0.78): torch==2.13.0 first, then infinity-emb[server,torch,optimum] with a
# constraints file holding torch==2.13.0+cpu (the [all] extra downgrades transformers and pulls torchvision).
# The optimum engine also needs an ONNX export of the model; bench_server.py makes one with optimum-cli.
set -euo pipefail
VENV="${1:-/work/bench-venvs/infinity}"
PYTHON="${PYTHON:-python3}"
INFINITY_VERSION="${INFINITY_VERSION:-0.0.78}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
# torch is already installed; the constraint keeps pip from replacing it with another build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "infinity-emb[server,torch,optimum]==${INFINITY_VERSION}"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("infinity-emb", "torch", "transformers", "optimum", "onnxruntime"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
PY
echo "Infinity venv ready: $VENV"
