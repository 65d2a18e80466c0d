#!/usr/bin/env bash
# GPU check: (image x point) evaluations per second of the paper's protocol on the DDPM
# CIFAR-10 architecture, in fp32, bf16, bf16 + channels_last and compiled, and the projected
# time of the full protocol (10,000 images x 1,000 points).  Under 5 minutes on one GPU.
#
# Installs nothing: it needs torch (with CUDA) and diffusers already present, and runs the
# package from this checkout (PYTHONPATH=src).  Usage, from the repository root:
#
#     bash benchmarks/gpu_check.sh                 # on a machine with a GPU
#     DRY_RUN=1 bash benchmarks/gpu_check.sh       # CPU dry run, tiny sizes (~1 minute)
#
# Extra arguments are passed to benchmarks/gpu_throughput.py (e.g. --batch 500).
# Figures are also written to ${OUT:-.}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"

"$PYTHON" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "diffusers", "numpy", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)} (this script installs nothing)")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
EOF

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exec timeout 600 "$PYTHON" benchmarks/gpu_throughput.py --device cpu --quick --compile-backend eager \
        --json "$OUT_DIR/gpu_check.json" "$@"
fi
# No variant starts after 150 s (the compiled one, last, takes a minute or two to compile); the
# whole run is cut at 285 s, and the figures of the variants done so far are already printed
# and written.
exec timeout 285 "$PYTHON" benchmarks/gpu_throughput.py --device cuda --points 1000 --images 10 --batch 1000 \
    --budget 150 --json "$OUT_DIR/gpu_check.json" "$@"
