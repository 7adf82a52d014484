"""unipeft under DDP and FSDP2 with two processes on the CPU (gloo), as users launch them.

One launch per engine (``torchrun --standalone --nproc_per_node 2``) trains one method of
each family on its half of a fixed global batch (``tests/distributed/_cases.py``), saves on
every rank, reloads on every rank, and tries a merge. This process trains the same models on
the whole batch; the ranks' saved adapters must equal its tensors, and every rank's reloaded
model must give its loss. FSDP1 needs a GPU: the same worker runs it in ``test_gpu_distributed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _once import made_once

import unipeft
import unipeft.distributed as ud
from unipeft.contract.errors import AdapterError

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))
import _cases  # noqa: E402

ENGINES = ("ddp", "fsdp2")


def launch(args: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> None:
    """Run a launcher's command line (``env`` added to this process's environment); its
    output in the error when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(processes), *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    def produce(folder: Path) -> None:
        for engine in ENGINES:
            launch(torchrun(str(HERE / "_worker.py"), engine, str(folder)))

    out = made_once(tmp_path_factory, "distributed", produce)
    reports = {e: json.loads((out / f"report-{e}.json").read_text()) for e in ENGINES}
    return {"out": out, "reports": reports}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[list[float], float, Path]]:
    out = tmp_path_factory.mktemp("single")
    refs = {}
    for method in _cases.CASES:
        losses, after = _cases.reference(method, out / method)
        refs[method] = (losses, after, out / method)
    return refs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", list(_cases.CASES))
def test_two_ranks_train_what_one_process_trains(runs, references, engine, method):
    report = runs["reports"][engine]
    assert report["world"] == 2
    seen = report["cases"][method]
    assert seen["engine"] == ("fsdp2" if engine == "fsdp2" else None)
    trained = _cases.saved(runs["out"] / engine / method)
    expected = _cases.saved(references[method][2])
    assert trained.keys() == expected.keys()
    initial = _cases.model(method)
    moved = 0
    for key, tensor in expected.items():
        assert trained[key].dtype == tensor.dtype and trained[key].shape == tensor.shape, key
        start = _initial(initial, key)
        if method in _cases.UPDATE_RTOL:
            ours, theirs = trained[key] - start, tensor - start
            assert (ours - theirs).norm() <= _cases.UPDATE_RTOL[method] * theirs.norm(), key
        else:
            torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
        moved += int(not torch.equal(tensor, start))
    assert moved > 0, "training changed no saved tensor: the comparison would prove nothing"
    # every rank reloaded the saved adapters (sharded again under FSDP2) and got the trained loss
    rel = _cases.LOSS_RTOL.get(method, 1e-5)
    assert seen["reloaded_loss"] == pytest.approx(references[method][1], rel=rel, abs=1e-6)
    if method.endswith("@bf16"):  # the adapters stayed float32 beside the bfloat16 backbone
        assert {t.dtype for t in trained.values()} == {torch.float32}
        assert next(_cases.model(method).base_model.parameters()).dtype == torch.bfloat16


def _initial(model: unipeft.DeltaModel, key: str) -> torch.Tensor:
    """The untrained value of saved tensor ``key`` (``adapter::site::method.param``)."""
    adapter, site, rest = key.split("::")
    param = rest.split(".", 1)[1]
    return model.get_adapter(adapter).delta_at(site).state_dict()[param]


def test_merge_under_fsdp2_refuses_and_says_what_to_do(runs):
    message = runs["reports"]["fsdp2"]["cases"]["lora"]["merge_error"]
    assert "FSDP2" in message and "model.save(dir)" in message and "unipeft.load" in message
    assert "merge_error" not in runs["reports"]["ddp"]["cases"]["lora"]  # DDP merges as usual


@pytest.mark.parametrize("engine", ENGINES)
def test_peft_export_under_sharding_loads_in_peft(runs, references, engine):
    peft = pytest.importorskip("peft")
    ids = _cases.batch()
    theirs = peft.PeftModel.from_pretrained(
        _cases.backbone(), str(runs["out"] / engine / "peft_lora")
    )
    ours = unipeft.load(_cases.backbone(), str(references["lora"][2]))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )


def test_single_process_helpers():
    model = _cases.model("lora")
    assert ud.rank() == 0 and ud.world_size() == 1 and ud.is_main_process()
    assert ud.sharding_engine(model) is None and not ud.any_sharded([model])
    assert [type(b).__name__ for b in ud.blocks(model)] == ["LlamaDecoderLayer"] * 2
    assert ud.unwrap(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)) is not model  # fmt: skip
    policy = ud.fsdp_wrap_policy(model)
    blocks = set(map(id, ud.blocks(model)))
    wrapped = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert {id(m) for m in wrapped} == blocks
    with pytest.raises(AdapterError, match="process group"):
        ud.shard(model)
    with pytest.raises(TypeError, match="DeltaModel"):
        ud.shard(model.base_model)
