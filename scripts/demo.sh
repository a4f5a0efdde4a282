#!/usr/bin/env bash
# Quick start 1: transcribe real speech with the embedded offline engine.
# No account, no microphone, no network at run time: a bundled recording is streamed at real
# time through the daemon, and each finished turn is printed (console sink) and appended to
# ./demo-turns.jsonl (file sink). Pass a WAV path to transcribe your own file instead.
set -euo pipefail
WAV=""
if [[ $# -gt 0 ]]; then
    WAV=$(realpath -m -- "$1")   # relative to where you ran it; the daemon checks the file
fi
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
WAV=${WAV:-$PWD/tests/data/speech/espeak-five-sentences.wav}
export TRANSCRIBED_CONFIG="$PWD/config/demo.toml"
export TRANSCRIBED_AUDIO__PATH="$WAV"
export TRANSCRIBED_SINKS__JOURNAL__PATH="$PWD/demo-turns.jsonl"
echo "demo: transcribing $WAV with the offline engine; turns also go to demo-turns.jsonl" >&2
exec .venv/bin/transcribed run
