#!/usr/bin/env bash
# Set up and run the local demo: vLLM (CPU) with the tiny demo model and two adapters, and the gateway on :8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/loragate demo "$@"
