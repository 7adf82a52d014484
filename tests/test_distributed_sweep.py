"""Every registered method under FSDP2 and DDP on 2 CPU ranks (slow: about a minute).

``tests/distributed/_sweep.py`` gives each method that attaches to the tiny Llama one SGD
step on each rank's half of a global batch and saves on every rank; here the same step on
the whole batch in one process must give the same saved tensors. A method skipped by the
ranks must be one that cannot attach to a Llama here either."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_distributed import HERE, launch, torchrun

sys.path.insert(0, str(HERE))
import _cases
import _sweep

from unipeft.contract.errors import UnipeftError

pytestmark = pytest.mark.slow
ENGINES = ("fsdp2", "ddp")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    for engine in ENGINES:
        launch(torchrun(str(HERE / "_sweep.py"), engine, str(out)), timeout=900)
    return out, {e: json.loads((out / f"sweep-{e}.json").read_text()) for e in ENGINES}


@pytest.mark.parametrize("method", _sweep.methods())
def test_every_method_trains_on_two_ranks_as_in_one(sweeps, method, tmp_path):
    out, reports = sweeps
    try:
        model = _sweep.sweep_model(method)
    except UnipeftError:
        for engine in ENGINES:
            assert reports[engine][method].startswith("skipped:"), reports[engine][method]
        pytest.skip(f"{method} does not attach to a Llama: {reports['fsdp2'][method][:120]}")
    _cases.one_step(model, _cases.batch())
    model.save(str(tmp_path))
    expected = _cases.saved(tmp_path)
    for engine in ENGINES:
        assert reports[engine][method] == "ok", reports[engine][method]
        trained = _cases.saved(out / engine / method)
        assert trained.keys() == expected.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-6)
