#!/usr/bin/env bash
# Set up .venv if needed (pinned CPU torch), then build the tiny model, train it and show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/training-hub demo "$@"
