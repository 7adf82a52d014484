"""DeepSpeed ZeRO-2 and ZeRO-3 with unipeft models, on the CPU: two gloo processes.

DeepSpeed runs on the CPU through its CPU accelerator (``DS_ACCELERATOR=cpu``), which talks
gloo when oneCCL is not installed. Every check of the default run comes from ONE launch of
this file as a torchrun worker (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_deepspeed.py worker OUT cpu``): for one method of each family
(``tests/distributed/_cases.py``) and each ZeRO stage, the ranks train the same seeded
adapter with ``torch.optim.AdamW`` as DeepSpeed's client optimizer on their halves of the
global batch, then save on every rank, gather with :mod:`unipeft.distributed.zero`, try
merging, and reload the saved adapters onto a fresh backbone. The same launch trains LoRA
in float32 on a bfloat16 backbone, and the Hugging Face ``Trainer`` with
``TrainingArguments(deepspeed=...)``. Rank 0 writes what it saw; the tests compare it with
one process (``_cases.reference``: the whole global batch, plain AdamW). A slow test runs
the HF Trainer through ``accelerate launch --use_deepspeed`` as well.

``stage3_param_persistence_threshold: 0`` makes ZeRO-3 partition even these tiny tensors
(by default DeepSpeed keeps every tensor under 100k elements whole on every rank, and the
test would not see a partitioned parameter at all).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _once import made_once
from test_distributed import launch as launch_command
from test_distributed import torchrun

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import _cases

import unipeft
from unipeft.distributed import zero

HERE = Path(__file__).resolve()
STAGES = (2, 3)
# one method of each family; the float32-adapter-on-bfloat16 case ("lora@bf16") has its
# own, exact, check against micro-batches (test_fp32_adapter_beside_bf16_backbone)
FAMILIES = [m for m in _cases.CASES if "@" not in m]


# ----------------------------------------------------------------------------- worker side
def ds_config(stage: int, micro_batch: int, world: int) -> dict[str, Any]:
    """fp32 ZeRO, a torch optimizer as the client optimizer (no compiled DeepSpeed ops)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def hf_config(stage: int) -> dict[str, Any]:
    """:func:`ds_config` for the HF Trainer, which fills the batch sizes in itself."""
    config = ds_config(stage, 1, 1)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        config[key] = "auto"
    del config["train_batch_size"]
    return config


def _skip_shm_build(deepspeed: Any) -> None:
    # On the CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce
    # (used only by inference) with the C++ compiler when it starts: 30 s the first time.
    # Marking the op unavailable (DeepSpeed keeps this dict for the process) skips that.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _train(deepspeed: Any, model: Any, config: dict, local: torch.Tensor, steps: int) -> tuple:
    """``deepspeed.initialize`` with AdamW over the trainable tensors, then ``steps`` steps
    on this rank's ``local`` batch: the engine and each step's local loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_cases.LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().clone())
    return engine, losses


def _worker(out: Path, device: str) -> None:
    """One rank: ``device`` is ``cpu`` (gloo) or ``cuda`` (NCCL, one GPU per rank)."""
    os.environ.setdefault("DS_ACCELERATOR", device)
    import deepspeed
    import torch.distributed as dist

    from unipeft.contract.errors import MergeError
    from unipeft.distributed.gather import sharding_engine

    if device == "cpu":
        _skip_shm_build(deepspeed)
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else None
    per = _cases.GLOBAL_BATCH // world
    ids = _cases.batch().to(dev)
    local = ids[rank * per : (rank + 1) * per]
    report: dict[str, Any] = {"world": world, "runs": {}}
    for stage in STAGES:
        for method in FAMILIES:
            model = _cases.model(method)
            seen: dict[str, Any] = {"frozen": sum(not p.requires_grad for p in model.parameters())}
            config = ds_config(stage, per, world)
            engine, losses = _train(deepspeed, model, config, local, _cases.STEPS)
            deltas = [p for n, p in model.named_parameters() if n.startswith("deltas.")]
            seen["partitioned_deltas"] = sum(zero.is_partitioned(p) for p in deltas)
            seen["deltas"] = len(deltas)
            seen["partitioned_base"] = sum(
                zero.is_partitioned(p) for p in model.base_model.parameters()
            )
            seen["engine"] = sharding_engine(model)
            for loss in losses:
                dist.all_reduce(loss)
            seen["losses"] = [float(loss) / world for loss in losses]
            seen["still_frozen"] = all(not p.requires_grad for p in model.base_model.parameters())
            folder = out / f"zero{stage}" / method
            model.save(str(folder))  # every rank calls it; rank 0 writes
            state = zero.full_state_dict(model.deltas)  # every rank gathers the same
            if rank == 0:
                torch.save(state, out / f"zero{stage}" / f"{method}.gathered.pt")
            seen["partitioned_after_gather"] = sum(zero.is_partitioned(p) for p in deltas)
            seen["empty_after_gather"] = sum(p.numel() == 0 for p in deltas)
            if method == "lora":
                unipeft.interop.peft.save(model, str(out / f"zero{stage}" / "peft_lora"))
                seen.update(_merge_checks(engine, model, ids, MergeError))
            engine.destroy()
            dist.barrier()
            again = unipeft.load(_cases.backbone(), str(folder))
            with torch.no_grad():
                cpu_ids = ids.cpu()
                seen["reloaded_loss"] = float(again(input_ids=cpu_ids, labels=cpu_ids).loss)
            report["runs"][f"zero{stage}/{method}"] = seen
    report["mixed"] = {
        f"zero{s}": _mixed_dtypes(deepspeed, out, s, local, per, world) for s in STAGES
    }
    report["hf"] = {f"zero{s}": _hf_trainer(out, s, world, dev) for s in STAGES}
    if device == "cuda" or os.environ.get("UNIPEFT_DS_BF16") == "1":  # slow on a CPU
        report["bf16"] = _bf16_zero3(deepspeed, out, local, per, world)
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()


def _logits(engine: Any, ids: torch.Tensor) -> torch.Tensor:
    # through the engine: under ZeRO-3 its forward gathers what the hosts read of the deltas
    with torch.no_grad():
        return engine(input_ids=ids).logits.detach().clone()


def _merge_checks(engine: Any, model: Any, ids: torch.Tensor, merge_error: type) -> dict:
    """``model.merge()`` on the engine's module (the merge ledger gathers what it folds
    under ZeRO-3): the outputs are unchanged, the base weights changed and (ZeRO-3)
    partitioned again, and ``unmerge()`` restores them bit for bit; or the MergeError."""
    engine.eval()
    seen: dict[str, Any] = {}
    before = _logits(engine, ids)
    sites = {id(a.site.module): a.site.module for a in model.get_adapter("default").attachments}
    weights = [m.weight for m in sites.values()]
    with zero.gathered(weights):
        pristine = [w.detach().clone() for w in weights]
    try:
        model.merge()
    except merge_error as exc:
        seen["merge_error"] = str(exc)
    else:
        seen["merge_diff"] = float((_logits(engine, ids) - before).abs().max())
        with zero.gathered(weights):
            seen["weights_changed"] = any(not torch.equal(w, p) for w, p in zip(weights, pristine))
        seen["repartitioned"] = all(w.numel() == 0 for w in weights if zero.is_partitioned(w))
        model.unmerge()
        with zero.gathered(weights):
            seen["unmerge_exact"] = all(torch.equal(w, p) for w, p in zip(weights, pristine))
    engine.train()
    return seen


def _hf_trainer(
    out: Path, stage: int, world: int, dev: torch.device | None, *, launched: bool = False
) -> dict[str, Any]:
    """The unmodified HF Trainer under DeepSpeed: it trains, ``model.save`` on every rank
    writes the whole adapter, and the saved adapter reloads onto a fresh backbone with the
    trained model's outputs. DeepSpeed's config comes from ``TrainingArguments(deepspeed=
    ...)``, or, when ``launched``, from ``accelerate launch --use_deepspeed``."""
    from transformers import Trainer, TrainingArguments

    model = _cases.model("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = _cases.batch()
    data = [{"input_ids": row, "labels": row} for row in ids]
    config = None if launched else hf_config(stage)
    arguments = TrainingArguments(
        output_dir=str(out / f"hf{stage}"),
        max_steps=2,
        per_device_train_batch_size=_cases.GLOBAL_BATCH // world,
        learning_rate=_cases.LR,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        deepspeed=config,
        use_cpu=dev is None and not launched,  # under accelerate's DeepSpeed: its device
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=data)
    trainer.train()
    folder = out / f"hf{stage}" / "adapter"
    model.save(str(folder))  # every rank calls it; rank 0 writes
    engine = trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        trained = engine(input_ids=ids.to(dev)).logits.detach().cpu()
    state = {f"deltas.{k}": v for k, v in zero.full_state_dict(model.deltas).items()}
    moved = sum(not torch.equal(state[n], before[n].cpu()) for n in before)
    engine.destroy()
    torch.distributed.barrier()
    again = unipeft.load(_cases.backbone(), str(folder))
    with torch.no_grad():
        reloaded = again(input_ids=ids).logits
    return {
        "engine_class": type(engine).__name__,
        "trainable": len(before),
        "moved": moved,
        "reload_diff": float((reloaded - trained).abs().max()),
        "partitioned": sum(zero.is_partitioned(p) for p in model.deltas.parameters()),
    }


def mixed_reference(folder: Path, world: int = 2, device: str = "cpu") -> None:
    """``_cases.model("lora@bf16")``: LoRA in fp32 on a bf16 backbone. One process, the
    global batch as ``world`` micro-batches (bf16 activations round by
    the batch they run in, so the reference runs the ranks' halves), gradients averaged."""
    model = _cases.model("lora@bf16").to(device)
    ids = _cases.batch().to(device)
    per = _cases.GLOBAL_BATCH // world
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_cases.LR)
    for _ in range(_cases.STEPS):
        for r in range(world):
            part = ids[r * per : (r + 1) * per]
            (model(input_ids=part, labels=part).loss / world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.save(str(folder))


def _mixed_dtypes(
    deepspeed: Any, out: Path, stage: int, local: torch.Tensor, per: int, world: int
) -> dict[str, Any]:
    """fp32 LoRA beside a bf16 backbone under ZeRO in DeepSpeed's fp32 mode (no ``bf16``
    section: that mode would cast the whole module, deltas included, to bf16)."""
    model = _cases.model("lora@bf16")
    engine, _ = _train(deepspeed, model, ds_config(stage, per, world), local, _cases.STEPS)
    model.save(str(out / f"mixed{stage}"))
    engine.destroy()
    return {
        "base_dtypes": sorted({str(p.dtype) for p in model.base_model.parameters()}),
        "delta_dtypes": sorted({str(p.dtype) for p in model.deltas.parameters()}),
    }


def _bf16_zero3(deepspeed: Any, out: Path, local: torch.Tensor, per: int, world: int) -> dict:
    """ZeRO-3 in DeepSpeed's bf16 mode (run on the GPU): DeepSpeed casts the whole module,
    deltas included, to bf16 and keeps fp32 master copies in the optimizer. LoRA trains (the
    loss falls) and model.save on every rank writes whole bf16 tensors of the full shapes."""
    model = _cases.model("lora")
    shapes = {k: list(v.shape) for k, v in model.deltas.state_dict().items()}
    config = {**ds_config(3, per, world), "bf16": {"enabled": True}}
    engine, losses = _train(deepspeed, model, config, local, _cases.STEPS + 2)
    model.save(str(out / "bf16"))
    engine.destroy()
    torch.distributed.barrier()
    saved = _cases.saved(out / "bf16")
    return {
        "losses": [float(loss) for loss in losses],
        "dtypes": sorted({str(t.dtype) for t in saved.values()}),
        "full_shapes": sorted(list(t.shape) for t in saved.values()) == sorted(shapes.values()),
    }


# ----------------------------------------------------------------------------- test side
def launch(
    out: Path, device: str = "cpu", timeout: int = 400, processes: int = 2
) -> dict[str, Any]:
    """Run the worker on ``processes`` ranks (``device``: ``cpu`` or ``cuda``, one GPU a
    rank); rank 0's report."""
    cmd = torchrun(str(HERE), "worker", str(out), device, processes=processes)
    launch_command(cmd, timeout, env={"DS_ACCELERATOR": device})
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    out = made_once(tmp_path_factory, "deepspeed", launch)
    ref = tmp_path_factory.mktemp("reference")
    return json.loads((out / "report.json").read_text()), out, ref


@pytest.fixture(scope="module")
def references(runs: tuple[dict[str, Any], Path, Path]) -> dict[str, tuple[list[float], float]]:
    _, _, ref = runs
    return {m: _cases.reference(m, ref / m) for m in FAMILIES}


RUNS = [(s, m) for s in STAGES for m in FAMILIES]
CPU_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def check_training(
    runs: tuple[dict[str, Any], Path, Path],
    references: dict[str, tuple[list[float], float]],
    stage: int,
    method: str,
    rtol: float,
    atol: float,
) -> None:
    """The ranks' run of ``method`` under ZeRO-``stage`` against the single process."""
    report, out, ref = runs
    seen = report["runs"][f"zero{stage}/{method}"]
    losses, after = references[method]
    assert seen["frozen"] > 0 and seen["still_frozen"]
    assert seen["losses"] == pytest.approx(losses, rel=rtol / 10, abs=atol / 10)
    want = _cases.saved(ref / method)
    got = _cases.saved(out / f"zero{stage}" / method)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        torch.testing.assert_close(got[key], tensor, rtol=rtol, atol=atol, msg=key)
    assert seen["reloaded_loss"] == pytest.approx(after, rel=rtol / 10, abs=atol / 10)


def check_peft_export(runs: tuple[dict[str, Any], Path, Path], stage: int, **tol: Any) -> None:
    """The PEFT folder written on every rank equals the reference adapter's export."""
    from safetensors.torch import load_file

    from unipeft.features.interop.peft import WEIGHTS_FILE

    _, out, ref = runs
    if not (ref / "peft_lora").exists():
        again = unipeft.load(_cases.backbone(), str(ref / "lora"))
        unipeft.interop.peft.save(again, str(ref / "peft_lora"))
    want = load_file(str(ref / "peft_lora" / WEIGHTS_FILE))
    got = load_file(str(out / f"zero{stage}" / "peft_lora" / WEIGHTS_FILE))
    assert sorted(got) == sorted(want) and want
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, msg=key, **tol)


def check_partitioning(runs: tuple[dict[str, Any], Path, Path], stage: int) -> None:
    report, out, _ = runs
    for method in FAMILIES:
        seen = report["runs"][f"zero{stage}/{method}"]
        if stage == 3:
            assert seen["engine"] == "zero3"
            assert seen["partitioned_deltas"] == seen["deltas"] > 0
            assert seen["partitioned_base"] > 0
            assert seen["empty_after_gather"] == seen["deltas"]  # slices again
        else:
            assert seen["engine"] is None
            assert seen["partitioned_deltas"] == seen["partitioned_base"] == 0
        gathered = torch.load(out / f"zero{stage}" / f"{method}.gathered.pt")
        saved = _cases.saved(out / f"zero{stage}" / method)
        assert len(saved) == len(gathered)
        for key, tensor in saved.items():
            _, site, rest = key.split("::")
            pname = rest.split(".", 1)[1]
            module_key = site.replace(".", "__")
            torch.testing.assert_close(gathered[f"default.{module_key}.{pname}"], tensor)


def check_merge(runs: tuple[dict[str, Any], Path, Path], stage: int, atol: float) -> None:
    report, _, _ = runs
    seen = report["runs"][f"zero{stage}/lora"]
    # merge() folds under ZeRO-3 too (the ledger gathers each weight): the outputs keep the
    # adapter's contribution (its factors are perturbed, so a fold that did nothing would
    # change them) and unmerge() restores the weights bit for bit
    assert "merge_error" not in seen, seen.get("merge_error")
    assert seen["merge_diff"] < atol and seen["weights_changed"] and seen["repartitioned"]
    assert seen["unmerge_exact"]


def check_hf_trainer(runs: tuple[dict[str, Any], Path, Path], stage: int, atol: float) -> None:
    report, _, _ = runs
    seen = report["hf"][f"zero{stage}"]
    assert seen["engine_class"] == "DeepSpeedEngine"
    assert seen["trainable"] > 0 and seen["moved"] == seen["trainable"]
    assert seen["reload_diff"] < atol
    assert (seen["partitioned"] > 0) == (stage == 3)


@pytest.mark.parametrize(("stage", "method"), RUNS)
def test_zero_training_matches_one_process(
    runs: tuple[dict[str, Any], Path, Path],
    references: dict[str, tuple[list[float], float]],
    stage: int,
    method: str,
) -> None:
    """Each family trains under ZeRO-2/3 on two ranks exactly as one process on the whole
    global batch: the losses, and the saved adapter (model.save on every rank) tensor by
    tensor; the backbone stays frozen; the saved adapter reloads with the same loss."""
    check_training(runs, references, stage, method, **CPU_TOLERANCE)


@pytest.mark.parametrize("stage", STAGES)
def test_zero3_partitions_and_gathers(runs: tuple[dict[str, Any], Path, Path], stage: int) -> None:
    """Under ZeRO-3 every delta tensor and backbone weight is partitioned, and
    ``zero.full_state_dict`` gives the whole trained tensors (equal to what model.save
    wrote), leaving them partitioned again; under ZeRO-2 nothing is partitioned."""
    check_partitioning(runs, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_peft_export_under_zero(
    runs: tuple[dict[str, Any], Path, Path],
    references: dict[str, tuple[list[float], float]],
    stage: int,
) -> None:
    """``unipeft.interop.peft.save`` on every rank writes the whole trained LoRA."""
    check_peft_export(runs, stage, **CPU_TOLERANCE)


@pytest.mark.parametrize("stage", STAGES)
def test_merge_under_zero(runs: tuple[dict[str, Any], Path, Path], stage: int) -> None:
    """``merge()`` on a ZeRO-2 or ZeRO-3 model keeps the outputs, changes the base weights
    (partitioned again under ZeRO-3), and ``unmerge()`` restores them bit for bit."""
    check_merge(runs, stage, atol=1e-4)


def check_mixed_dtypes(
    runs: tuple[dict[str, Any], Path, Path], stage: int, device: str = "cpu", **tol: Any
) -> None:
    report, out, ref = runs
    seen = report["mixed"][f"zero{stage}"]
    assert seen["base_dtypes"] == ["torch.bfloat16"]
    assert seen["delta_dtypes"] == ["torch.float32"]
    if not (ref / "mixed").exists():  # the ranks' micro-batches, however many ranks ran
        mixed_reference(ref / "mixed", world=report["world"], device=device)
    want, got = _cases.saved(ref / "mixed"), _cases.saved(out / f"mixed{stage}")
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], tensor, msg=key, **tol)


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_adapter_beside_bf16_backbone(
    runs: tuple[dict[str, Any], Path, Path], stage: int
) -> None:
    """LoRA in fp32 on a bf16 backbone trains under ZeRO-2/3 (DeepSpeed's fp32 mode): the
    dtypes stay as they were and the adapter equals one process's on the same micro-batches."""
    check_mixed_dtypes(runs, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_hf_trainer_under_zero(runs: tuple[dict[str, Any], Path, Path], stage: int) -> None:
    """The Hugging Face Trainer trains an unmodified unipeft model under DeepSpeed ZeRO;
    model.save on every rank writes the whole adapter; it reloads with the same outputs."""
    check_hf_trainer(runs, stage, atol=1e-5)


# ------------------------------------------------------------- no DeepSpeed, no processes
def test_plain_tensors_are_not_partitioned() -> None:
    t = torch.nn.Parameter(torch.ones(3))
    assert not zero.is_partitioned(t)
    assert not zero.is_partitioned(torch.ones(2)) and not zero.is_partitioned(None)
    assert zero.gathered_size(t) == torch.Size([3])


def test_gathered_is_a_no_op_without_zero3() -> None:
    """Without ZeRO-3 parameters nothing is gathered and DeepSpeed is not imported."""
    model = unipeft.apply(_cases.backbone(), "lora", r=2)
    before = "deepspeed" in sys.modules
    params = list(model.parameters())
    with zero.gathered([*params, None, torch.ones(1)], modifier_rank=0):
        ran = True
    assert ran and ("deepspeed" in sys.modules) == before
    state = zero.full_state_dict(model.deltas)
    assert state.keys() == model.deltas.state_dict().keys()
    for key, tensor in model.deltas.state_dict().items():
        assert torch.equal(state[key], tensor)
        assert state[key].data_ptr() != tensor.data_ptr()  # a copy, not the parameter
    named = dict(model.deltas.named_parameters())
    copies = zero.gather_for_save(named)
    assert all(torch.equal(copies[n], p) and copies[n] is not p for n, p in named.items())
    atts = model.get_adapter("default").attachments
    wanted = zero.merge_parameters(atts)
    assert {id(a.site.module.weight) for a in atts} <= {id(t) for t in wanted}
    assert {id(p) for a in atts for p in a.delta.parameters()} <= {id(t) for t in wanted}


class _FakeZero3(torch.nn.Parameter):
    """A parameter carrying ZeRO-3's marks, to check what is recognised and in what order."""


def _fake(ds_id: int, open_context: int = 0) -> torch.Tensor:
    p = _FakeZero3(torch.empty(0))
    p.ds_id, p.ds_status, p.ds_shape = ds_id, "NOT_AVAILABLE", (4, 2)
    if open_context:
        p._ds_z3_gathered_param_context_depth = open_context
    return p


def test_zero3_marks_are_recognised() -> None:
    a, b, held = _fake(7), _fake(3), _fake(5, open_context=1)
    assert zero.is_partitioned(a) and zero.gathered_size(a) == torch.Size([4, 2])
    # once each, in ds_id order (every rank the same), leaving what an outer block holds
    assert zero._partitioned([a, b, a, held, torch.ones(1)]) == [b, a]


def _accelerate_worker(out: Path, stage: int, device: str) -> None:
    """One rank under ``accelerate launch --use_deepspeed``: only the HF Trainer."""
    os.environ.setdefault("DS_ACCELERATOR", device)
    import deepspeed

    if device == "cpu":
        _skip_shm_build(deepspeed)
    dev = None if device == "cpu" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    world = int(os.environ["WORLD_SIZE"])
    seen = _hf_trainer(out, stage, world, dev, launched=True)
    if int(os.environ["RANK"]) == 0:
        (out / "report.json").write_text(json.dumps({"hf": {f"zero{stage}": seen}}))


def launch_accelerate(
    out: Path, stage: int, device: str = "cpu", timeout: int = 400, processes: int = 2
) -> dict:
    """The HF Trainer on ``processes`` ranks through ``accelerate launch --use_deepspeed``
    with a DeepSpeed config file (its DeepSpeed launcher takes one process as well); rank
    0's report."""
    config = out / "deepspeed.json"
    config.write_text(json.dumps(hf_config(stage)))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [
        *accelerate, "--use_deepspeed", "--deepspeed_config_file", str(config),
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(HERE), "accelerate-worker", str(out), str(stage), device,
    ]  # fmt: skip
    launch_command(cmd, timeout, env={"DS_ACCELERATOR": device})
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_hf_trainer_under_accelerate_launch_zero3(tmp_path: Path) -> None:
    """``accelerate launch --use_deepspeed --deepspeed_config_file ...`` with the HF Trainer
    (no deepspeed argument in TrainingArguments): ZeRO-3 partitions the unipeft model, it
    trains, model.save on every rank writes the whole adapter, which reloads with the same
    outputs. (Slow: one more launch, 35 s on two cores.)"""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    report = launch_accelerate(tmp_path, 3)
    check_hf_trainer((report, tmp_path, tmp_path), 3, atol=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "cpu")
elif __name__ == "__main__" and sys.argv[1:2] == ["accelerate-worker"]:
    _accelerate_worker(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
