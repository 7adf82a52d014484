"""LoRA (Hu et al., 2021): :mod:`.delta` holds the method, :mod:`.fast` its fused kernels."""

from ....blocks import add_low_rank, low_rank_factors
from .delta import METHOD, LoraConfig, LoraDelta
from .fast import SharedDown, update_fused_slices

__all__ = [
    "METHOD",
    "LoraConfig",
    "LoraDelta",
    "SharedDown",
    "add_low_rank",
    "low_rank_factors",
    "update_fused_slices",
]
