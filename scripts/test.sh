#!/usr/bin/env bash
# Set up everything this project needs (idempotent), then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the full-size tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
