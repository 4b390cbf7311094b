#!/usr/bin/env bash
# Set up everything this project needs (idempotent), then run the main job: the parity check
# of r18vd on the embedded default (seeded weights in the official layout, no download).
# Extra arguments go to `rtdetr-parity check`, e.g. `bash scripts/main.sh --variant r50vd`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rtdetr-parity check --variant r18vd "$@"
