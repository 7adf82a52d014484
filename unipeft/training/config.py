"""The trainer's configuration: a frozen pydantic model, every field described."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

RESUME_FIELDS = (
    "seed",
    "batch_size",
    "lr",
    "weight_decay",
    "grad_clip",
    "group_lr",
    "schedule",
    "warmup",
)
"""Fields that must not change when a run resumes: they shape the data order or the updates,
so a different value could not continue the same run. The others (``steps``, the
intervals, ``device``, ``step_mode``) may change, except ``steps`` under a schedule that
depends on it."""


class DistributedConfig(BaseModel):
    """How the trainer runs when launched as several processes (``torchrun``, ``accelerate
    launch``): the engine that keeps the ranks' models in step, and its settings. In one
    process none of it applies."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    engine: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto",
        description="'ddp' (DistributedDataParallel), 'fsdp2' (unipeft.distributed.shard), or "
        "'auto': FSDP2 when accelerate launch was configured for FSDP version 2, else DDP",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="the process group's backend when the trainer starts it: 'auto' is nccl "
        "on CUDA, gloo on the CPU",
    )
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="FSDP2 only: compute in this dtype (MixedPrecisionPolicy.param_dtype; "
        "gradients are reduced in float32); null: the parameters' own dtypes",
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP2 only: free each block's gathered parameters after its forward "
        "(less memory) rather than keep them for the backward (less communication)",
    )
    find_unused_parameters: bool = Field(
        False,
        description="DDP only: let trainable parameters go unused in a step (slower; needed "
        "when a method skips some of its parameters)",
    )

    @model_validator(mode="after")
    def _check_engine_options(self) -> DistributedConfig:
        fsdp_only = []
        if self.param_dtype is not None:
            fsdp_only.append(f"param_dtype: {self.param_dtype}")
        if not self.reshard_after_forward:
            fsdp_only.append("reshard_after_forward: false")
        if self.engine == "ddp" and fsdp_only:
            raise ValueError(
                f"{', '.join(fsdp_only)} only applies to FSDP2; set engine: fsdp2 or drop it"
            )
        if self.engine == "fsdp2" and self.find_unused_parameters:
            raise ValueError(
                "find_unused_parameters only applies to DDP; set engine: ddp or drop it"
            )
        return self


class TrainerConfig(BaseModel):
    """How :class:`unipeft.training.Trainer` trains: AdamW, at a constant learning rate
    unless ``schedule`` or ``warmup`` say otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    steps: int = Field(100, ge=1, description="number of optimizer steps to train for")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (the schedule's peak)")
    group_lr: dict[str, float] = Field(
        default_factory=dict,
        description="learning rates of the parameters under these module names (e.g. "
        "{'head': 1e-3}; the longest matching name wins), in place of lr",
    )
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="'constant', or 'linear': decay to 0 at the last step"
    )
    warmup: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of the steps over which the learning rate rises linearly "
        "from lr/w to lr (w: that many steps, at least 1)",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    batch_size: int = Field(
        8,
        ge=1,
        description="examples per optimizer step; launched as several processes, this is the "
        "global batch, of which each rank trains on batch_size / world",
    )
    eval_every: int = Field(
        0, ge=0, description="run eval_fn every this many steps and at the end; 0: only at the end"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="write a checkpoint every this many steps; 0: only at the end"
    )
    seed: int = Field(
        0, ge=0, description="seeds the data order (per epoch) and torch's generator (dropout)"
    )
    seed_generators: bool = Field(
        True,
        description="seed torch's, Python's and NumPy's generators with seed at a fresh "
        "start; false: keep their state (seeded by the caller before building the model)",
    )
    grad_clip: float | None = Field(
        None, gt=0, description="clip the gradients' global L2 norm to this; null: no clipping"
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    log_every: int = Field(
        10, ge=1, description="record the loss to metrics.jsonl every this many steps"
    )
    step_mode: Literal["auto", "eager", "graphs", "compile"] = Field(
        "auto",
        description="how each step runs: 'auto' (CUDA graphs on CUDA in one process, eager "
        "on the CPU and under DDP/FSDP2), 'eager' (plain PyTorch: the opt-out), 'graphs' "
        "(one CUDA graph replayed per batch; needs batches of one shape), 'compile' "
        "(torch.compile(dynamic=False) of the forward and loss); forced modes need CUDA",
    )
    measure_memory: bool = Field(
        False,
        description="measure the peak memory of training (TrainResult.peak_memory_bytes); on "
        "CPU this resets the process's resident-size high-water mark",
    )

    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="when launched as several processes: the engine and its settings (a "
        "string is the engine alone: 'ddp', 'fsdp2', 'auto'); batch_size stays the global "
        "batch, each rank trains on its slice",
    )

    @field_validator("distributed", mode="before")
    @classmethod
    def _engine_shorthand(cls, value: object) -> object:
        return {"engine": value} if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(
                f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
            )
        return value

    @field_validator("group_lr")
    @classmethod
    def _check_group_lr(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: lr for name, lr in value.items() if not lr > 0}
        if bad:
            raise ValueError(f"learning rates must be greater than 0, got {bad}")
        return value

    def lr_factor(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) over its peak: the warm-up's ramp,
        then 1 (constant) or a linear decay that reaches 0 after the last step."""
        warm = max(1, int(self.warmup * self.steps))
        if self.schedule == "linear":
            decay = max(0.0, (self.steps - step) / max(1, self.steps - warm))
        else:
            decay = 1.0
        return min((step + 1) / warm, decay)

    def resolved_device(self) -> str:
        """The device to train on: ``auto`` becomes ``cuda`` when one is available."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
