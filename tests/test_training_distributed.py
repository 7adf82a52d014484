"""unipeft's Trainer and ``unipeft train`` launched as two processes on the CPU (gloo).

Each launch runs ``tests/distributed/_train_worker.py``: every rank trains one method of each
family (``tests/distributed/_cases.py``) with :class:`unipeft.training.Trainer` on its slice
of every global batch, the trainer starting the process group from the launcher's
environment. This process trains the same models with the same Trainer in one process; the
ranks' adapters, logged losses (averaged over the ranks) and evaluations must equal its.

Launches (each ~10 s of imports): ``torchrun`` (DDP, FSDP2, and an FSDP2 run stopped after
one step and resumed), ``accelerate launch --use_fsdp --fsdp_version 2`` (the trainer picks
FSDP2 from accelerate's environment, then DDP), and ``torchrun -m unipeft train`` with a
``distributed:`` section. ``accelerate launch --cpu --num_processes 2`` starts a single
process unless given an MPI hostfile, so the CPU tests launch accelerate's torchrun-based
launchers (``--use_fsdp``; ``--multi_gpu`` in the slow test), which run on CPUs as well.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _once import made_once

from unipeft.training import RunConfigError, TrainerConfig, TrainingError, load_run_config, run
from unipeft.training import distributed as tdist

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))
import _cases  # noqa: E402
from test_distributed import launch, torchrun  # noqa: E402

WORKER = str(HERE / "_train_worker.py")
BIN = Path(sys.executable).parent
METHODS = list(_cases.CASES)
ACCELERATE_METHODS = ["lora", "prompt_tuning", "moe_lora"]  # the rest: the slow test
# Adam divides each gradient by the root of its running square, so an entry with a near-zero
# gradient moves by the rounding noise of the split sums (~1e-4 over 3 steps), and bfloat16
# sums differ with the split: the update (trained - initial) is compared, relative to its norm
UPDATE_RTOL = {"lora@bf16": 0.15}
LOSS_RTOL = {"lora@bf16": 1e-2}


def accelerate(*args: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]  # fmt: skip


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """Every case trained by the Trainer in this process on the whole global batch."""
    out = tmp_path_factory.mktemp("single")
    return {m: (_cases.trainer_run(m, out / m), out / m) for m in METHODS}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    def by_torchrun(out: Path) -> None:
        launch(torchrun(WORKER, str(out), "ddp", "fsdp2"))

    def by_accelerate(out: Path) -> None:
        launch(accelerate("--use_fsdp", "--fsdp_version", "2", WORKER, str(out), "auto", "ddp",
                          "--methods", ",".join(ACCELERATE_METHODS)))  # fmt: skip

    runs = {}
    for name, produce in (("torchrun", by_torchrun), ("accelerate", by_accelerate)):
        out = made_once(tmp_path_factory, f"trainer-{name}", produce)
        runs[name] = (json.loads((out / "report.json").read_text()), out)
    return runs


CASES = [("torchrun", "ddp", "ddp"), ("torchrun", "fsdp2", "fsdp2"),
         ("accelerate", "auto", "fsdp2"), ("accelerate", "ddp", "ddp")]  # fmt: skip


def _check_adapter(folder: Path, reference: Path, method: str, rtol: float = 1e-3) -> None:
    trained, expected = _cases.saved(folder), _cases.saved(reference)
    initial = _cases.saved_initial(method, reference)
    assert trained.keys() == expected.keys()
    rtol = UPDATE_RTOL.get(method, rtol)
    moved = 0
    for key, tensor in expected.items():
        assert trained[key].dtype == tensor.dtype and trained[key].shape == tensor.shape, key
        ours, theirs = trained[key] - initial[key], tensor - initial[key]
        assert (ours - theirs).norm() <= rtol * theirs.norm() + 1e-7, key
        moved += int(theirs.norm() > 0)
    assert moved, "training changed no saved tensor: the comparison would prove nothing"


def _params() -> list:
    return [
        pytest.param(launcher, engine, used, method)
        for launcher, engine, used in CASES
        for method in (ACCELERATE_METHODS if launcher == "accelerate" else METHODS)
    ]


@pytest.mark.parametrize(("launcher", "engine", "used", "method"), _params())
def test_ranks_train_what_one_process_trains(launched, references, launcher, engine, used,
                                             method):  # fmt: skip
    report, out = launched[launcher]
    seen = report["cases"][f"{engine}/{method}"]
    assert seen["world"] == 2 and seen["engine"] == used
    result, ref_dir = references[method]
    folder = out / engine / method
    _check_adapter(folder / "adapter", ref_dir / "adapter", method)
    # the logged loss is averaged over the ranks: the loss of the whole global batch
    losses = [h["loss"] for h in seen["history"]]
    expected = [h["loss"] for h in result.history]
    assert losses == pytest.approx(expected, rel=LOSS_RTOL.get(method, 1e-5), abs=1e-6)
    # rank 0 alone wrote the metrics (one line a step) and the checkpoint, holding whole tensors
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    ckpt = _cases.load_file(str(folder / "checkpoint" / "trainable.safetensors"))
    ref_ckpt = _cases.load_file(str(ref_dir / "checkpoint" / "trainable.safetensors"))
    assert ckpt.keys() == ref_ckpt.keys()
    for key, tensor in ref_ckpt.items():
        assert ckpt[key].shape == tensor.shape, key


@pytest.mark.parametrize(("launcher", "engine", "used", "method"), _params())
def test_eval_fn_on_every_rank_sees_the_trained_model(launched, references, launcher, engine,
                                                      used, method):  # fmt: skip
    seen = launched[launcher][0]["cases"][f"{engine}/{method}"]
    result = references[method][0]
    evals = [h["eval_loss"] for h in seen["history"]]  # after each step, on rank 0
    expected = [h["eval_loss"] for h in result.history]
    assert evals == pytest.approx(expected, rel=LOSS_RTOL.get(method, 1e-5), abs=1e-6)


def test_fsdp2_resume_equals_an_uninterrupted_run(launched, references):
    report, out = launched["torchrun"]
    assert report["resumed"]["start"] == 1
    ref_dir = references["lora"][1]
    assert [h["step"] for h in report["resumed"]["history"]] == [2, 3]
    _check_adapter(out / "fsdp2-resumed" / "adapter", ref_dir / "adapter", "lora")
    # the checkpoint's optimizer state is whole (gathered from the shards), like one process's
    theirs = _cases.load_file(str(out / "fsdp2-resumed" / "checkpoint" / "optimizer.safetensors"))
    ours = _cases.load_file(str(ref_dir / "checkpoint" / "optimizer.safetensors"))
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(theirs[key], tensor, rtol=1e-3, atol=1e-6, msg=key)


def test_the_trainer_started_and_reused_the_process_group(launched):
    for report, _ in launched.values():
        assert report["first_started_group"] is True and report["later_started_group"] is False


TRAIN_CSV = "text,label\n" + "".join(
    f"{w} {v} {w},{'pos' if i % 2 else 'neg'}\n"
    for i, (w, v) in enumerate(zip("abcdefgh", "stuvwxyz", strict=True))
)


def _run_yaml(folder: Path, out: str, section: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text(TRAIN_CSV)
    path = folder / "run.yaml"
    path.write_text(
        "model: tiny:llama\ndata: {path: train.csv, max_length: 8}\nmethod: lora\n"
        "config: {r: 4}\ntrainer: {steps: 3, lr: 0.01, batch_size: 4, log_every: 1, "
        f"device: cpu}}\noutput_dir: {out}\n{section}"
    )
    return path


def test_unipeft_train_under_torchrun_matches_one_process(tmp_path):
    section = "distributed: {engine: fsdp2, backend: gloo}\n"
    config = _run_yaml(tmp_path, "ranks", section)
    launch(torchrun("-m", "unipeft", "train", str(config), "--no-progress"))
    single = run(_run_yaml(tmp_path / "one", "single", section), progress=False)
    assert single.train.step == 3
    for sub, name in (("adapter", "unipeft_adapters.safetensors"),
                      ("classifier", "head.safetensors")):  # fmt: skip
        theirs = _cases.load_file(str(tmp_path / "ranks" / sub / name))
        ours = _cases.load_file(str(tmp_path / "one" / "single" / sub / name))
        assert theirs.keys() == ours.keys() and theirs
        for key, tensor in ours.items():
            torch.testing.assert_close(theirs[key], tensor, rtol=1e-3, atol=2e-4, msg=key)
    lines = (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert losses == pytest.approx([h["loss"] for h in single.train.history], rel=1e-5)


# --------------------------------------------------------------- in this process, quick


def test_distributed_section_is_validated_with_its_line(tmp_path):
    path = _run_yaml(tmp_path, "out", "distributed:\n  engine: zero3\n")
    with pytest.raises(RunConfigError, match=r"run.yaml:8: distributed.engine: .*'ddp'"):
        load_run_config(path)
    path = _run_yaml(tmp_path, "out", "distributed:\n  engine: ddp\n  param_dtype: bfloat16\n")
    with pytest.raises(RunConfigError, match="param_dtype: bfloat16 only applies to FSDP2"):
        load_run_config(path)
    path = _run_yaml(tmp_path, "out", "distributed: {engin: ddp}\n")
    with pytest.raises(RunConfigError, match="Did you mean 'engine'"):
        load_run_config(path)
    path = _run_yaml(tmp_path, "out", "distributed: {engine: ddp}\n")
    path.write_text(path.read_text().replace("device: cpu", "device: cpu, distributed: ddp"))
    with pytest.raises(RunConfigError, match=r"run.yaml:5: distributed is given twice"):
        load_run_config(path)
    cfg = load_run_config(_run_yaml(tmp_path, "out", "distributed: {engine: fsdp2}\n"))
    assert cfg.distributed.engine == "fsdp2" and cfg.distributed.reshard_after_forward


def test_trainer_config_distributed_shorthand_and_checks():
    assert TrainerConfig(distributed="fsdp2").distributed.engine == "fsdp2"
    assert TrainerConfig().distributed.engine == "auto"
    with pytest.raises(ValueError, match="find_unused_parameters only applies to DDP"):
        TrainerConfig(distributed={"engine": "fsdp2", "find_unused_parameters": True})


def test_each_rank_takes_its_slice_of_every_global_batch():
    batches = [[5, 2, 7, 0], [1, 3, 6]]
    parts = [tdist.rank_batches(batches, tdist.Ranks(r, 2)) for r in range(2)]
    assert parts == [[[5, 2], [1, 3]], [[7, 0], [6]]]
    assert tdist.rank_batches(batches, tdist.Ranks()) is batches
    with pytest.raises(TrainingError, match="at least one example per rank"):
        tdist.rank_batches([[1]], tdist.Ranks(0, 2))
    with pytest.raises(TrainingError, match="multiple of 2"):
        tdist.check_batches(8, 3, 2)
    with pytest.raises(TrainingError, match="fewer than the 2 ranks"):
        tdist.check_batches(9, 4, 2)
    tdist.check_batches(10, 4, 2)


@pytest.mark.slow
def test_accelerate_multi_gpu_launcher_on_cpus(tmp_path, references):
    """accelerate's DDP launcher (torchrun underneath) on CPUs, with the trainer's own FSDP2."""
    launch(accelerate("--multi_gpu", WORKER, str(tmp_path), "ddp", "fsdp2"))
    for engine in ("ddp", "fsdp2"):
        for method in METHODS:
            _check_adapter(tmp_path / engine / method / "adapter",
                           references[method][1] / "adapter", method)  # fmt: skip


GPU_PROCESSES = min(2, torch.cuda.device_count())  # one rank per GPU (NCCL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_two_gpus_over_nccl(tmp_path, references):
    """DDP and FSDP2 on up to two GPUs, a rank each (nccl, chosen by backend auto), against
    the CPU reference. With one GPU, ``WORLD_SIZE`` is 1: the trainer starts no process
    group and trains the model unwrapped (engine None), on the whole global batch."""
    launch(torchrun(WORKER, str(tmp_path), "ddp", "fsdp2", "--device", "cuda",
                    processes=GPU_PROCESSES))  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    for engine in ("ddp", "fsdp2"):
        for method in METHODS:
            seen = report["cases"][f"{engine}/{method}"]
            assert seen["world"] == GPU_PROCESSES
            assert seen["engine"] == (engine if GPU_PROCESSES > 1 else None)
            _check_adapter(tmp_path / engine / method / "adapter",
                           references[method][1] / "adapter", method, rtol=2e-2)  # fmt: skip
    _check_adapter(tmp_path / "fsdp2-resumed" / "adapter", references["lora"][1] / "adapter",
                   "lora", rtol=2e-2)  # fmt: skip
