"""Building blocks for methods, public so that a plugin can build what the built-ins build.

- :mod:`~unipeft.blocks.lowrank`: the low-rank update ``s · B A`` of a projection
  (:class:`LowRankDelta`), its shared config fields (:class:`LowRankConfig`) and helpers
  (:func:`low_rank_refusal`: the size check of a rank against a projection).

The base weights a merge or a weight-aware delta reads come from the site itself:
:meth:`unipeft.ModuleSite.weight_views`.
"""

from .lowrank import (
    LowRankConfig,
    LowRankDelta,
    add_low_rank,
    low_rank_factors,
    low_rank_parameters,
    low_rank_refusal,
    low_rank_scaling,
)

__all__ = [
    "LowRankConfig",
    "LowRankDelta",
    "add_low_rank",
    "low_rank_factors",
    "low_rank_parameters",
    "low_rank_refusal",
    "low_rank_scaling",
]
