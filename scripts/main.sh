#!/usr/bin/env bash
# Set up everything this project needs (idempotent), then run the main job: the migration
# report of r18vd on the embedded default (seeded weights in the official layout, no download)
# into reports/r18vd, replacing the one there, with the fault catalogue's fast tier run now.
# The screen shows the phases with their progress; Jittor's compiler output goes to a log under
# runs/logs/ (add --verbose to see it).
# Extra arguments go to `rtdetr-parity report`, e.g. `bash scripts/main.sh --bench none`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=reports/r18vd
status=0
.venv/bin/rtdetr-parity report --variant r18vd --out "$OUT" --force --faults run "$@" || status=$?
if [[ -f "$OUT/report.md" ]]; then
    echo "report: $OUT/report.md (also $OUT/report.html, data in $OUT/data/)"
fi
if ((status != 0)); then
    echo "rtdetr-parity report exited with status $status"
fi
exit "$status"
