#!/usr/bin/env bash
# Run the benchmarks of docs/benchmarks.md and rewrite its generated sections.
#
#   bench/run_all.sh            start-up, turn -> sink latency, cloud path vs the SDK, floors (~15 min)
#   REPS=5 bench/run_all.sh     more repetitions of the cloud A B C block (default 3)
#   bench/run_all.sh --all      also the local-engine and lossless-session benchmarks
#
# Needs the dev environment (scripts/bootstrap.sh or scripts/test.sh), mosquitto, and
# optionally hyperfine (apt install hyperfine; without it start-up is timed with subprocess).
# The long run (hours) is separate: .venv/bin/python bench/soak.py --minutes 120, then report.py.
# Raw results land in bench/results/*.json. The machine should be otherwise idle: every
# section reports how busy the rest of it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

$PY bench/startup.py --runs "${STARTUP_RUNS:-50}"
$PY bench/sink_latency.py --turns "${TURNS:-1000}"
$PY bench/cloud.py --reps "${REPS:-3}"
$PY bench/floor.py --seconds 30
if [[ "${1:-}" == "--all" ]]; then
    $PY bench/local_engine.py --write
    $PY bench/lossless.py | tee bench/results/lossless.json
fi
$PY bench/report.py
