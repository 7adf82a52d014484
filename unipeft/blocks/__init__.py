"""Building blocks for methods, public so that a plugin can build what the built-ins build.

- :mod:`~unipeft.blocks.lowrank`: the low-rank update ``s · B A`` of a projection
  (:class:`LowRankDelta`), its shared config fields (:class:`LowRankConfig`) and helpers
  (:func:`low_rank_refusal`: the size check of a rank against a projection).
- :mod:`~unipeft.blocks.fused`: a projection and its low-rank update as one autograd node
  (:func:`lora_linear`, :func:`dora_linear`): fewer passes over activations, nothing
  saved beyond what autograd keeps anyway.
- :mod:`~unipeft.blocks.routing`: mixture-of-experts routers (:class:`Router`: soft, top-k,
  top-p; per token or per sample) and their losses (:func:`load_balancing_loss`,
  :func:`z_loss`).

The base weights a merge or a weight-aware delta reads come from the site itself:
:meth:`unipeft.ModuleSite.weight_views`.
"""

from .fused import dora_linear, lora_linear
from .lowrank import (
    LowRankConfig,
    LowRankDelta,
    add_low_rank,
    low_rank_factors,
    low_rank_parameters,
    low_rank_refusal,
    low_rank_scaling,
)
from .routing import (
    Router,
    RouterKind,
    RoutingLevel,
    gates_from_probs,
    load_balancing_loss,
    router_parameters,
    same_choices,
    top_k_gates,
    top_p_gates,
    top_p_mask,
    z_loss,
)

__all__ = [
    "LowRankConfig",
    "LowRankDelta",
    "Router",
    "RouterKind",
    "RoutingLevel",
    "add_low_rank",
    "dora_linear",
    "gates_from_probs",
    "load_balancing_loss",
    "lora_linear",
    "low_rank_factors",
    "low_rank_parameters",
    "low_rank_refusal",
    "low_rank_scaling",
    "router_parameters",
    "same_choices",
    "top_k_gates",
    "top_p_gates",
    "top_p_mask",
    "z_loss",
]
