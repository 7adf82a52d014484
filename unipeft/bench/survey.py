"""Two of the survey's experiments on a Hugging Face text model (default: the real MiniLM).

``latency``: inference throughput of the plain backbone, LoRA unmerged and merged, and
serial and parallel bottleneck adapters, interleaved repetitions, medians.

``memory``: peak memory of one training step (forward, backward, AdamW) for full
fine-tuning, LoRA on an fp32 base, and LoRA on a bf16 base. Each variant runs in a fresh
process, so one variant's allocations cannot hide in another's peak: on CUDA the peak is
``torch.cuda.max_memory_allocated`` over the allocation after the model is built; on the CPU
(Linux) the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
model is built) over the resident set at that moment. An int8 base is
reported as unavailable: PyTorch has no int8 training kernels for it on these platforms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch
from torch import nn

import unipeft

LORA = {"method": "lora", "r": 8, "targets": ["attn.q", "attn.v"]}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "base": None,
    "lora (unmerged)": LORA,
    "lora (merged)": {**LORA, "merge": True},
    "adapter (serial)": {"method": "bottleneck_adapter", "bottleneck": 64},
    "adapter (parallel)": {
        "method": "bottleneck_adapter",
        "bottleneck": 64,
        "placement": "parallel",
    },
}


def _inputs(model: nn.Module, batch: int, length: int, device: str) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    def once(fn: Callable[[], Any]) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return once


def latency(
    make: Callable[[], nn.Module],
    *,
    batch: int = 32,
    length: int = 64,
    repeats: int = 15,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Median seconds per batch and samples per second of each variant, interleaved."""
    models: dict[str, nn.Module] = {}
    for name, spec in VARIANTS.items():
        backbone = make().to(device).eval()
        if spec is None:
            models[name] = backbone
            continue
        config = {k: v for k, v in spec.items() if k not in ("method", "merge")}
        model = unipeft.apply(backbone, spec["method"], **config)
        with torch.no_grad():
            for p in model.deltas.parameters():  # trained-looking deltas, not zeros
                p.normal_(0, 0.02)
        if spec.get("merge"):
            model.merge()
        models[name] = model.eval()
    inputs = _inputs(models["base"], batch, length, device)
    once = _timer(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm up every variant first
            model(**inputs)
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for name, model in models.items():
                times[name].append(once(lambda m=model: m(**inputs)))
    base = median(times["base"])
    return [
        {
            "variant": name,
            "seconds_per_batch": median(ts),
            "samples_per_second": batch / median(ts),
            "ratio_to_base": median(ts) / base,
            "batch": batch,
            "length": length,
            "device": device,
        }
        for name, ts in times.items()
    ]


MEMORY_VARIANTS = ("full fine-tuning", "lora (fp32 base)", "lora (bf16 base)", "lora (int8 base)")

_CHILD = r"""
import json, sys, torch
import unipeft
from unipeft.cli._backbones import load_backbone
from unipeft.bench.survey import _inputs
spec, variant, batch, length, device = sys.argv[1:6]
batch, length = int(batch), int(length)
model = load_backbone(spec).model
if variant == "lora (bf16 base)":
    model = model.to(torch.bfloat16)
model = model.to(device).train()
if variant.startswith("lora"):
    model = unipeft.apply(model, "lora", r=8, targets=["attn.q", "attn.v"])
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
inputs = _inputs(model, batch, length, device)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to the current RSS
        fh.write("5")
    before = status("VmRSS")
for _ in range(2):
    out = model(**inputs).last_hidden_state
    out.float().square().mean().backward()
    opt.step(); opt.zero_grad(set_to_none=True)
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
else:
    peak = status("VmHWM") - before
print(json.dumps({"peak_bytes": int(peak), "trainable": sum(p.numel() for p in params)}))
"""


def memory(
    spec: str, *, batch: int = 16, length: int = 64, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Peak memory of two training steps per variant, each in a fresh process."""
    rows = []
    for variant in MEMORY_VARIANTS:
        row: dict[str, Any] = {
            "variant": variant,
            "device": device,
            "batch": batch,
            "length": length,
        }
        if variant == "lora (int8 base)":
            row.update(peak_bytes=None, note="no int8 training kernels in PyTorch here")
            rows.append(row)
            continue
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, spec, variant, str(batch), str(length), device],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory run {variant!r} failed:\n{proc.stderr[-2000:]}")
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append(row)
    return rows
