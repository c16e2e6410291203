#!/usr/bin/env bash
# Wheels that python -m pipeline.bench.gpu_check needs beyond a stock PyTorch image, for a GPU machine with no package
# index: downloaded here into .whl/ (git-ignored; about 58 MB), carried there, installed with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Versions are this checkout's (.venv); the target Python is 3.12 on x86-64 Linux unless PY_VERSION says.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(polars polars-runtime-32 pydantic pydantic-core annotated-types typing-inspection typing-extensions peft)
PINS=$(.venv/bin/python - "${PKGS[@]}" <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $PINS
# transformers stays the image's: its wheel would take the carried files past a 64 MB transfer limit
du -sh .whl
