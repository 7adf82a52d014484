"""The trainer's configuration: a frozen pydantic model, every field described."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

RESUME_FIELDS = ("seed", "batch_size", "lr", "weight_decay", "grad_clip")
"""Fields that must not change when a run resumes: they shape the data order or the updates,
so a different value could not continue the same run. The others (``steps``, the
intervals, ``device``) may change."""


class TrainerConfig(BaseModel):
    """How :class:`unipeft.training.Trainer` trains: AdamW at a constant learning rate."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    steps: int = Field(100, ge=1, description="number of optimizer steps to train for")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    batch_size: int = Field(8, ge=1, description="examples per batch (per optimizer step)")
    eval_every: int = Field(
        0, ge=0, description="run eval_fn every this many steps and at the end; 0: only at the end"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="write a checkpoint every this many steps; 0: only at the end"
    )
    seed: int = Field(
        0, ge=0, description="seeds the data order (per epoch) and torch's generator (dropout)"
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

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(
                f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
            )
        return value

    def resolved_device(self) -> str:
        """The device to train on: ``auto`` becomes ``cuda`` when one is available."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
