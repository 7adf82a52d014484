"""(IA)^3 for unipeft: learned channel-wise rescaling of activations (Liu et al., 2022).

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") multiplies the
keys, the values and the FFN's intermediate activation by learned vectors ``l_k``, ``l_v``
and ``l_ff``, one value per channel. This distribution adds it to unipeft purely through the
``unipeft`` entry-point group: nothing in unipeft itself knows about it.

Where the FFN is scaled. The paper scales the FFN's hidden activation *after* its
nonlinearity, ``W2 (l_ff ⊙ γ(W1 x))``. A unipeft delta sees a site's output, and only output
channels can be folded into a site's weight, so this plugin scales the output of ``mlp.up``
(``W1 x``, the intermediate activation up to the nonlinearity) instead: ``γ(l_ff ⊙ W1 x)``.
That keeps the method mergeable into ``W1``. For ReLU and a positive ``l_ff`` both forms are
the same function; for GELU/SiLU they differ slightly but have the same parameter count, the
same identity at init, and the same role (amplify or inhibit each hidden unit).

Usage::

    import unipeft

    model = unipeft.apply(backbone, "ia3")  # targets attn.k, attn.v, mlp.up
    model.merge()  # fold the scales into the projections' weights and biases
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor, nn

import unipeft
from unipeft import AdditiveDelta, DeltaConfig, Method, ModuleSite, Site

__version__ = "0.1.0"

DEFAULT_TARGETS = ("attn.k", "attn.v", "mlp.up")


class Ia3Config(DeltaConfig):
    """(IA)^3 has one hyperparameter: where the scales start."""

    init: float = Field(
        1.0,
        gt=0,
        le=10,
        description="initial value of every scale; 1.0 makes the adapter the identity at init",
    )


class Ia3Delta(AdditiveDelta):
    """``y ⊙ l``: one learned scale per output channel of a projection (its slice, if fused).

    It belongs to the additive family (new parameters beside the frozen backbone) but acts
    multiplicatively, so it overrides ``forward`` instead of implementing ``transform``.
    Because the scale is per output channel of a projection, it folds exactly into that
    projection's weight rows and bias, which is what :meth:`merged` does.
    """

    def __init__(self, features: int, init: float = 1.0, channel_dim: int = -1) -> None:
        super().__init__(placement="serial", scaling=1.0, channel_dim=channel_dim)
        self.l = nn.Parameter(torch.full((features,), float(init)))

    def _broadcast(self, ndim: int, dim: int, dtype: torch.dtype) -> Tensor:
        """``l`` shaped to broadcast along axis ``dim`` of an ``ndim``-d tensor."""
        shape = [1] * ndim
        shape[dim] = -1
        return self.l.to(dtype).view(shape)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        # the scale never reads the input, so it works on any site output layout
        return y * self._broadcast(y.ndim, self.channel_dim, y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # diag(l) (W x + b) = (diag(l) W) x + l ⊙ b: scale weight rows (axis 0 of the
        # canonical (out, in, *kernel) layout) and the bias; a missing bias stays missing
        new_weight = weight * self._broadcast(weight.ndim, 0, weight.dtype)
        new_bias = None if bias is None else bias * self.l.to(bias.dtype)
        return new_weight, new_bias


def _build(cfg: Ia3Config, site: Site) -> Ia3Delta:
    assert isinstance(site, ModuleSite)
    return Ia3Delta(site.features, cfg.init, site.channel_dim)


def _count(cfg: Ia3Config, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return site.features


def _accepts(cfg: Ia3Config, site: Site) -> str | None:
    # a sublayer path's output is not one projection's rows, so it could not be merged
    if not isinstance(site, ModuleSite) or site.entry is not None:
        return f"{site.name!r} is not a single projection"
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


METHOD = Method(
    id="ia3",
    family="additive",
    config=Ia3Config,
    build=_build,
    num_parameters=_count,
    formula="d_out per projection (one scale per output channel, or per channel of its slice)",
    site_kinds=("projection",),
    default_targets=DEFAULT_TARGETS,
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == 1.0,
    paper="Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
    "In-Context Learning, 2022, arXiv:2205.05638",
    summary="learned channel-wise scaling of keys, values and FFN activations; mergeable",
    accepts=_accepts,
)


@unipeft.hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    """Called by unipeft when it builds its registry (entry point ``ia3`` in group unipeft)."""
    register(METHOD)


__all__ = ["DEFAULT_TARGETS", "METHOD", "Ia3Config", "Ia3Delta", "register_methods"]
