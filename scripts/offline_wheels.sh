#!/usr/bin/env bash
# Wheels of the Python packages dissect_ds needs beyond a PyTorch GPU image (DeepSpeed, open_clip,
# webdataset and what they pull in), for a node that cannot reach a package index: an air-gapped
# SLURM partition, or a GPU machine lent without network. The versions are the ones this
# checkout's venv runs its tests with; compiled ones (pydantic-core) are fetched for the node's
# Python. Run it here, where the index is reachable, then copy DIR to the node.
#
#   bash scripts/offline_wheels.sh DIR [PYTHON_VERSION]      # default 3.12
#
# On the node, whose python3 already holds torch, torchvision, numpy, pillow, pyyaml, tqdm,
# safetensors, huggingface-hub, timm, regex, psutil, msgpack, ninja, py-cpuinfo, einops and packaging:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=$PWD:/tmp/site PY=python3      # then: bash scripts/gpu_smoke.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bash scripts/offline_wheels.sh DIR [PYTHON_VERSION]}
PYVER=${2:-3.12}
PY=${PY:-.venv/bin/python}
# Pure-Python packages (any Python 3), then the one compiled package.
PURE=(deepspeed open_clip_torch webdataset braceexpand ftfy wcwidth hjson pydantic annotated-types
      typing-inspection typing-extensions)
COMPILED=(pydantic-core)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
for name in "${PURE[@]}"; do
  # DeepSpeed publishes a source distribution only: build its (pure-Python, no prebuilt ops) wheel.
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$name==$(version "$name")"
done
for name in "${COMPILED[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "$name==$(version "$name")"
done
ls -1 "$DIR"
du -sh "$DIR"
