#!/usr/bin/env bash
# Quick start 2: install what the tests need (apt + .venv), lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
