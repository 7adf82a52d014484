"""The Hugging Face ``transformers.Trainer`` with an unmodified unipeft model, launched by
``accelerate launch`` as two processes; ``tests/distributed/_train_hf.py`` is the script.

Same examples per step as one process: the Trainer's data loader goes through accelerate,
which orders the data with one seeded sampler on every rank and deals its per-device
batches out in turn (rank ``r`` takes batches ``r, r + world, ...``), so with
``per_device_train_batch_size = global / world`` the ranks of step ``k`` together hold
exactly the examples of one process's batch ``k`` with ``per_device_train_batch_size =
global``. The trained adapters and the logged losses must equal that process's.

On CPUs: DDP (``accelerate launch --multi_gpu``, which is torchrun underneath and needs no
GPU; ``--cpu --num_processes 2`` would start a single process without an MPI hostfile).
accelerate applies FSDP (version 1 or 2) only on accelerators: with ``use_cpu`` it picks its
multi-CPU (DDP) mode whatever the FSDP settings say, so FSDP runs in the GPU tests.

The GPU tests run one rank per GPU on up to two GPUs (NCCL puts one rank on a GPU). With
one GPU: ``accelerate launch --use_fsdp --num_processes 1`` still starts a torchrun rank and
accelerate still applies FSDP (FSDP2 shards over a mesh of one rank; FSDP1 turns its
strategy into ``NO_SHARD`` but keeps its wrapper and flat parameters). ``accelerate launch
--multi_gpu`` refuses fewer than two processes, and accelerate wraps a model in DDP only
when there are several, so the one-GPU DDP test starts the script with ``torchrun
--nproc_per_node 1`` (an NCCL process group of one rank) and the Trainer trains the model
itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))
import _cases  # noqa: E402
import _train_hf  # noqa: E402

SCRIPT = str(HERE / "_train_hf.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
FSDP = ["--use_fsdp", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
        "--fsdp_cpu_ram_efficient_loading", "false"]  # fmt: skip


GPU_PROCESSES = min(2, torch.cuda.device_count())  # one rank per GPU (NCCL)


def accelerate(
    out: Path, *flags: str, cuda: bool = False, processes: int = 2, torchrun: bool = False
) -> dict:
    """The script on ``processes`` ranks through ``accelerate launch FLAGS``, or, with
    ``torchrun``, through ``torchrun`` itself (no flags); rank 0's report."""
    launcher = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *flags]  # fmt: skip
    if torchrun:
        assert not flags, flags
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(processes)]  # fmt: skip
    args = [*launcher, SCRIPT, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [*args, *(["cuda"] if cuda else [])], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stderr[-6000:]}")
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("single")
    return _train_hf.train(out), out


def check(
    report: dict, out: Path, reference: tuple[dict, Path], rtol: float = 1e-3, world: int = 2
) -> None:
    ref, ref_out = reference
    assert report["world"] == world and ref["world"] == 1
    assert len(report["losses"]) == _cases.STEPS
    assert report["losses"] == pytest.approx(ref["losses"], rel=rtol * 1e-2, abs=1e-6)
    trained = _cases.saved(out / "adapter")
    expected = _cases.saved(ref_out / "adapter")
    initial = _cases.saved_initial("lora", ref_out / "adapter")
    assert trained.keys() == expected.keys() and expected
    for key, tensor in expected.items():
        assert trained[key].shape == tensor.shape and trained[key].dtype == tensor.dtype, key
        ours, theirs = trained[key] - initial[key], tensor - initial[key]
        assert theirs.norm() > 0, key  # every LoRA factor trained
        assert (ours - theirs).norm() <= rtol * theirs.norm(), key


def test_hf_trainer_under_accelerate_ddp_equals_one_process(tmp_path, reference):
    report = accelerate(tmp_path, "--multi_gpu")
    assert report["wrapper"] == "DistributedDataParallel" and report["engine"] is None
    check(report, tmp_path, reference)


needs_a_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_a_gpu
def test_hf_trainer_ddp_nccl(tmp_path, reference):
    if GPU_PROCESSES > 1:
        report = accelerate(tmp_path, "--multi_gpu", cuda=True, processes=GPU_PROCESSES)
    else:  # accelerate launch refuses --multi_gpu with one process
        report = accelerate(tmp_path, cuda=True, processes=1, torchrun=True)
    # accelerate wraps in DDP only with several processes; one rank trains the model itself
    wrapper = "DistributedDataParallel" if GPU_PROCESSES > 1 else "DeltaModel"
    assert report["wrapper"] == wrapper and report["engine"] is None
    check(report, tmp_path, reference, rtol=1e-2, world=GPU_PROCESSES)


@pytest.mark.gpu
@needs_a_gpu
def test_hf_trainer_fsdp2_plugin(tmp_path, reference):
    flags = [*FSDP, "--fsdp_version", "2"]
    report = accelerate(tmp_path, *flags, cuda=True, processes=GPU_PROCESSES)
    assert report["engine"] == "fsdp2"  # accelerate sharded the model in place
    check(report, tmp_path, reference, rtol=1e-2, world=GPU_PROCESSES)


@pytest.mark.gpu
@needs_a_gpu
def test_hf_trainer_fsdp1_plugin(tmp_path, reference):
    # frozen base and trainable deltas share FSDP1's outermost unit: use_orig_params
    flags = [*FSDP, "--fsdp_version", "1", "--fsdp_use_orig_params", "true",
             "--fsdp_sharding_strategy", "FULL_SHARD"]  # fmt: skip
    report = accelerate(tmp_path, *flags, cuda=True, processes=GPU_PROCESSES)
    assert report["engine"] == "fsdp1"  # with one rank FSDP1 runs NO_SHARD, still wrapped
    check(report, tmp_path, reference, rtol=1e-2, world=GPU_PROCESSES)
