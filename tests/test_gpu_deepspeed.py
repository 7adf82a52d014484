"""DeepSpeed ZeRO-2 and ZeRO-3 on the GPUs (NCCL): the checks of ``tests/test_deepspeed.py``.

The same worker runs with ``cuda`` instead of ``cpu``, one rank per GPU on up to two GPUs
(NCCL puts one rank on a GPU; with one GPU the single rank holds the whole global batch
and ZeRO-3 still partitions every parameter, into one slice): one launch of
``torchrun --standalone --nproc_per_node N tests/test_deepspeed.py worker OUT cuda`` trains
one method of each family under ZeRO-2 and ZeRO-3, saves, gathers, merges, reloads, and
runs the Hugging Face Trainer with ``TrainingArguments(deepspeed=...)``; on the GPU it also
trains LoRA under ZeRO-3 in DeepSpeed's bf16 mode. Then ``accelerate launch
--use_deepspeed --num_processes N`` runs the HF Trainer with a DeepSpeed config file, for
both stages.

The single-process reference trains on one GPU too (fp32: cuBLAS sums in another order
than the CPU, so the tolerances are a little wider than the CPU test's).

Run: ``pytest -m gpu tests/test_gpu_deepspeed.py`` on a host with one or more GPUs and
DeepSpeed installed (``pip install --no-index --find-links .whl deepspeed``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import test_deepspeed as ds
import torch

pytestmark = pytest.mark.gpu

_cases = ds._cases

GPU_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


PROCESSES = min(2, torch.cuda.device_count())  # one rank per GPU (NCCL)


def _need_gpu() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    _need_gpu()
    out = tmp_path_factory.mktemp("deepspeed_gpu")
    ref = tmp_path_factory.mktemp("reference_gpu")
    return ds.launch(out, "cuda", timeout=900, processes=PROCESSES), out, ref


def _reference(method: str, folder: Path) -> tuple[list[float], float]:
    """``_cases.reference`` on one GPU: the whole global batch, plain torch AdamW."""
    model = _cases.model(method).cuda()
    ids = _cases.batch().cuda()
    losses = list(_cases.steps(model, ids))
    model.save(str(folder))
    with torch.no_grad():
        after = float(model(input_ids=ids, labels=ids).loss)
    return losses, after


@pytest.fixture(scope="module")
def gpu_references(
    gpu_runs: tuple[dict[str, Any], Path, Path],
) -> dict[str, tuple[list[float], float]]:
    _, _, ref = gpu_runs
    return {m: _reference(m, ref / m) for m in ds.FAMILIES}


@pytest.mark.parametrize(("stage", "method"), ds.RUNS)
def test_zero_training_matches_one_gpu(
    gpu_runs: tuple[dict[str, Any], Path, Path],
    gpu_references: dict[str, tuple[list[float], float]],
    stage: int,
    method: str,
) -> None:
    assert gpu_runs[0]["world"] == PROCESSES
    ds.check_training(gpu_runs, gpu_references, stage, method, **GPU_TOLERANCE)


@pytest.mark.parametrize("stage", ds.STAGES)
def test_zero3_partitions_and_gathers_on_gpus(
    gpu_runs: tuple[dict[str, Any], Path, Path], stage: int
) -> None:
    ds.check_partitioning(gpu_runs, stage)


@pytest.mark.parametrize("stage", ds.STAGES)
def test_peft_export_under_zero_on_gpus(
    gpu_runs: tuple[dict[str, Any], Path, Path],
    gpu_references: dict[str, tuple[list[float], float]],
    stage: int,
) -> None:
    ds.check_peft_export(gpu_runs, stage, **GPU_TOLERANCE)


@pytest.mark.parametrize("stage", ds.STAGES)
def test_merge_under_zero_on_gpus(gpu_runs: tuple[dict[str, Any], Path, Path], stage: int) -> None:
    ds.check_merge(gpu_runs, stage, atol=1e-3)


@pytest.mark.parametrize("stage", ds.STAGES)
def test_hf_trainer_under_zero_on_gpus(
    gpu_runs: tuple[dict[str, Any], Path, Path], stage: int
) -> None:
    ds.check_hf_trainer(gpu_runs, stage, atol=1e-4)  # the reload runs on the CPU


@pytest.mark.parametrize("stage", ds.STAGES)
def test_fp32_adapter_beside_bf16_backbone_on_gpus(
    gpu_runs: tuple[dict[str, Any], Path, Path], stage: int
) -> None:
    ds.check_mixed_dtypes(gpu_runs, stage, device="cuda", **GPU_TOLERANCE)


def test_bf16_zero3_trains_and_saves_whole_tensors(
    gpu_runs: tuple[dict[str, Any], Path, Path],
) -> None:
    """DeepSpeed's bf16 mode casts the deltas to bf16 with the backbone (fp32 master
    weights live in the optimizer): LoRA trains, and model.save writes whole bf16 tensors."""
    seen = gpu_runs[0]["bf16"]
    assert all(math.isfinite(x) for x in seen["losses"])
    assert seen["losses"][-1] < seen["losses"][0]
    assert seen["dtypes"] == ["torch.bfloat16"] and seen["full_shapes"]


@pytest.mark.parametrize("stage", ds.STAGES)
def test_hf_trainer_under_accelerate_launch_on_gpus(tmp_path: Path, stage: int) -> None:
    """``accelerate launch --use_deepspeed --deepspeed_config_file ...`` (NCCL, a rank per GPU)."""
    _need_gpu()
    report = ds.launch_accelerate(tmp_path, stage, "cuda", timeout=600, processes=PROCESSES)
    ds.check_hf_trainer((report, tmp_path, tmp_path), stage, atol=1e-4)
