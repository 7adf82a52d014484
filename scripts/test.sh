#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv if needed (unipeft with its test extras
# and every example plugin under plugins/), then run pytest with the fast hypothesis profile,
# on one worker process per core (pytest-xdist; UNIPEFT_TEST_WORKERS sets another number, 0
# runs in this process), each with one intra-op thread.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch torchvision
"$PY" -m pip install -q -e '.[dev]'
# DeepSpeed (the ZeRO tests) ships as source only; built without its ops (they compile on
# first use, and the tests use none) it installs in seconds, against the torch above
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q setuptools wheel
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed
fi
for plugin in plugins/*/; do
  "$PY" -m pip install -q -e "$plugin"
done

export UNIPEFT_STRICT_PLUGINS=1              # a plugin that fails to load is an error
export UNIPEFT_HYPOTHESIS_PROFILE="${UNIPEFT_HYPOTHESIS_PROFILE:-unipeft-fast}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the workers share the cores: no oversubscription

# pytest exits 5 when it collected no test: report that as a failure, never as a pass
set +e
"$PY" -m pytest -q -n "${UNIPEFT_TEST_WORKERS:-auto}" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
