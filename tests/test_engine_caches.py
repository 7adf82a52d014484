"""Evaluations under an engine see the trained adapter, not values cached before a step.

Methods may cache what they derive from their parameters between passes without gradients,
keyed on each tensor's autograd version (LoRA stacks the factors of projections that share
their input). DeepSpeed writes its updated master weights into the parameters through
``.data`` under ZeRO-1/2 and gathers them in place under ZeRO-3, which leaves the versions as
they were; ``DeltaModel.forward`` bumps them before a pass without gradients on a model an
engine manages (``unipeft.distributed.refresh_versions``). FSDP2's case is checked by the
trainer's evaluations in ``tests/test_training_distributed.py``."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_distributed import HERE, launch, torchrun


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_evaluation_after_deepspeed_steps_sees_the_trained_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "losses.json"
    launch(torchrun(str(HERE / "_eval_worker.py"), str(out)), timeout=400)
    seen = json.loads(out.read_text())
    assert sorted(seen) == ["1", "2", "3"]
    for stage, losses in seen.items():
        assert losses["no_grad"] != losses["before"], f"ZeRO-{stage}: the steps changed nothing"
        assert losses["no_grad"] == pytest.approx(losses["grad"], rel=1e-6, abs=1e-7), stage
