#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv if needed, install unipeft, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch torchvision
.venv/bin/python -m pip install -q -e '.[vision]'
exec .venv/bin/python -m unipeft.demo "$@"
