"""GLoRA: generalized LoRA, a weight and a bias change built from the frozen weight.

Chavan et al., *One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning*, 2023,
arXiv:2306.07967. With the site's frozen weight ``W`` ``(d_out, d_in)`` and bias ``b``, the
adapted projection is

    W' = W + W ⊙ A + B            b' = b + b ⊙ D + E + W C

so ``ΔW = W ⊙ A + B`` and ``Δb = b ⊙ D + E + W C``. Each support has its own form, as in
Hugging Face PEFT's GLoRA:

- ``A`` and ``B`` (``config_A_B``): ``lora``, ``X_d X_u`` with ``X_d`` ``(d_out, r)`` and
  ``X_u`` ``(r, d_in)``; ``vector``, ``(d_out, 1)``, one value per output row, broadcast
  along it; ``constant``, one scalar; ``none``, nothing;
- ``C`` (``config_C``): ``lora``, ``X_d X_u`` with ``X_d`` ``(d_in, r)``, ``X_u`` ``(r, 1)``;
  ``vector``, ``(d_in, 1)``; ``none``;
- ``D`` and ``E`` (``config_D_E``): ``vector``, ``(d_out,)``; ``constant``, one scalar; ``none``.

``C``, ``D`` and ``E`` act on the bias, so a site whose module has no bias (Llama's
projections) has none of them, as in PEFT. With ``init_weights=True`` (the default) every
``X_d``, vector and scalar starts at zero (``X_u`` kaiming-uniform), so the adapter starts as
the identity; ``init_weights=False`` draws them all (kaiming-uniform, scalars from
``N(0, 0.02²)``), as PEFT does.

``W`` and ``b`` are the site's weights as stored, read through
:meth:`~unipeft.ModuleSite.weight_views` at every call (the rows of the site's slice of a
fused projection; the site is a plain attribute, nothing of it is saved). ``merge()`` folds
``ΔW`` and ``Δb`` of the weights it is given; as for HiRA and DoRA, an adapter merged after
another one reads the weights with the first folded in (PEFT computes every merged adapter
from the original ``W``; the two agree for one adapter per site). Nothing is shared across
sites.

PEFT equivalent: ``peft_type="GLORA"``; ``r``, ``config_A_B``, ``config_C``, ``config_D_E``
and ``init_weights`` map to the fields of the same name; the tensors ``glora_A.Xd`` /
``glora_A.Xu`` / ``glora_A.X`` (and B, C, D, E alike) are this delta's ``A.Xd``, ``A.Xu``,
``A.X``...; PEFT's ``glora_*.zeros`` buffers (a support set to ``none``) hold nothing.

Sites: every projection layout: Linear, GPT-2 ``Conv1D`` (its weight read as ``(d_out,
d_in)``), slices of fused projections, the ``in_proj`` slices of ``nn.MultiheadAttention``,
and convolutions, where ``W`` is read flattened to ``(d_out, d_in · k)`` (PEFT adapts
``nn.Linear`` only). Refused: a config that trains nothing at a site (every support
``none``, or ``config_A_B='none'`` at a site without a bias), naming the fields.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

PathKind = Literal["lora", "vector", "constant", "none"]


class GloraConfig(DeltaConfig):
    """The rank and the form of each support."""

    r: int = Field(8, ge=1, le=4096, description="rank of the supports set to 'lora'")
    config_A_B: Literal["lora", "vector", "constant", "none"] = Field(
        "lora",
        description="form of A and B (W' = W + W ⊙ A + B): lora (X_d X_u, r·(d_out + d_in) "
        "each), vector (one value per output row), constant (one scalar) or none",
    )
    config_C: Literal["lora", "vector", "none"] = Field(
        "lora",
        description="form of C (b' += W C): lora (X_d X_u, r·(d_in + 1)), vector (d_in) or none",
    )
    config_D_E: Literal["vector", "constant", "none"] = Field(
        "constant",
        description="form of D and E (b' = b + b ⊙ D + E): vector (d_out each), constant "
        "(one scalar each) or none",
    )
    init_weights: bool = Field(
        True,
        description="True: the adapter starts as the identity (X_d, vectors and scalars at "
        "zero); False: every tensor drawn at random, as PEFT's init_weights=False",
    )

    @model_validator(mode="after")
    def _trains_something(self) -> GloraConfig:
        if self.config_A_B == self.config_C == self.config_D_E == "none":
            raise ValueError(
                "config_A_B, config_C and config_D_E are all 'none': GLoRA would train nothing"
            )
        return self


class GloraPath(nn.Module):
    """One support: ``X_d X_u`` (``lora``), ``X`` (``vector``) or ``X[0]`` (``constant``)."""

    def __init__(self, kind: str, rows: int, cols: int, r: int, init_weights: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "lora":
            self.Xd = nn.Parameter(torch.zeros(rows, r))
            self.Xu = nn.Parameter(torch.empty(r, cols))
            nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
            if not init_weights:
                nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))
        elif kind in ("column", "row"):  # (rows, 1) broadcast along a row, or (rows,)
            self.X = nn.Parameter(torch.zeros((rows, 1) if kind == "column" else (rows,)))
            if not init_weights:  # a row is drawn as one (1, rows) matrix, as PEFT does
                target = self.X if kind == "column" else self.X.unsqueeze(0)
                with torch.no_grad():
                    nn.init.kaiming_uniform_(target, a=math.sqrt(5))
        else:  # constant
            self.X = nn.Parameter(torch.zeros(1))
            if not init_weights:
                nn.init.normal_(self.X, mean=0.0, std=0.02)

    def value(self) -> Tensor:
        if self.kind == "lora":
            return self.Xd @ self.Xu
        return self.X[0] if self.kind == "constant" else self.X

    @staticmethod
    def count(kind: str, rows: int, cols: int, r: int) -> int:
        return {"lora": r * (rows + cols), "column": rows, "row": rows, "constant": 1}.get(kind, 0)


def _kinds(cfg: GloraConfig, has_bias: bool) -> dict[str, str]:
    """The form of each support at a site: A/B are columns when 'vector', D/E rows."""
    ab = "column" if cfg.config_A_B == "vector" else cfg.config_A_B
    c = "column" if cfg.config_C == "vector" else cfg.config_C
    de = "row" if cfg.config_D_E == "vector" else cfg.config_D_E
    if not has_bias:
        c = de = "none"
    return {"A": ab, "B": ab, "C": c, "D": de, "E": de}


def _dims(out: int, fan_in: int) -> dict[str, tuple[int, int]]:
    """``(rows, cols)`` of each support's full matrix at a site."""
    return {"A": (out, fan_in), "B": (out, fan_in), "C": (fan_in, 1), "D": (out, 1), "E": (out, 1)}


def _shapes(site: ModuleSite) -> tuple[int, int, bool]:
    """``(d_out, fan_in, has_bias)`` of a projection site (fan_in: d_in · kernel elements)."""
    shape = ProjectionShape.of(site)
    return (
        shape.out_features,
        shape.in_features * math.prod(shape.kernel_size),
        (site.parameter("bias") is not None),
    )


class GloraDelta(ReparameterizedDelta):
    """``ΔW = W ⊙ A + B``, ``Δb = b ⊙ D + E + W C`` at one projection; ``W``, ``b`` read from
    the site at every call. Submodules ``A``...``E``, one per support that trains."""

    def __init__(self, site: ModuleSite, cfg: GloraConfig) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # not a module, parameter or buffer: nothing of it is saved
        out, fan_in, has_bias = _shapes(site)
        weight, _ = site.weight_views()
        if weight.shape[0] != out or weight[0].numel() != fan_in:
            raise ValueError(
                f"site {site.name!r}: its weight {tuple(weight.shape)} is not ({out}, {fan_in})"
            )
        dims = _dims(out, fan_in)
        self.kinds = _kinds(cfg, has_bias)
        for name, kind in self.kinds.items():
            if kind != "none":
                rows, cols = dims[name]
                self.add_module(name, GloraPath(kind, rows, cols, cfg.r, cfg.init_weights))

    def support(self, name: str) -> Tensor | None:
        path = self._modules.get(name)
        return None if path is None else path.value()  # type: ignore[operator]

    def changes(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(ΔW, Δb)`` for the given weight ``(d_out, d_in, *kernel)`` and bias, in the
        weight's dtype (``Δb`` None when nothing changes the bias)."""
        w = weight.reshape(weight.shape[0], -1)
        dtype = w.dtype
        a, b = self.support("A"), self.support("B")
        dw = torch.zeros_like(w)
        if a is not None:
            dw = dw + w * a.to(dtype)
        if b is not None:
            dw = dw + b.to(dtype)
        parts = []
        c, d, e = self.support("C"), self.support("D"), self.support("E")
        if d is not None and bias is not None:
            parts.append(bias * d.to(dtype))
        if e is not None:
            parts.append(e.to(dtype).expand(w.shape[0]))
        if c is not None:
            parts.append((w @ c.to(dtype)).squeeze(-1))
        db = sum(parts[1:], parts[0]) if parts else None
        return dw.reshape(weight.shape), db

    def delta_weight(self) -> Tensor:
        """``W ⊙ A + B`` for the site's weight as stored now (read it unmerged)."""
        weight, bias = self.site.weight_views()
        return self.changes(weight.detach(), bias)[0]

    def delta_bias(self) -> Tensor | None:
        weight, bias = self.site.weight_views()
        return self.changes(weight.detach(), None if bias is None else bias.detach())[1]

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, bias = self.site.weight_views()
        dw, db = self.changes(weight.detach(), None if bias is None else bias.detach())
        update = self.shape.project(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))
        return y + update.to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W + ΔW, b + Δb)`` for the weights given."""
        with torch.no_grad():
            dw, db = self.changes(weight, bias)
            if db is None:
                return weight + dw, bias
            return weight + dw, (db if bias is None else bias + db)


def _build(cfg: GloraConfig, site: Site) -> GloraDelta:
    assert isinstance(site, ModuleSite)
    return GloraDelta(site, cfg)


def _count(cfg: GloraConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    out, fan_in, has_bias = _shapes(site)
    dims = _dims(out, fan_in)
    kinds = _kinds(cfg, has_bias)
    return sum(GloraPath.count(kinds[n], *dims[n], cfg.r) for n in kinds)


def _size_check(cfg: GloraConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None:
        return None
    if cfg.config_A_B == "none" and site.parameter("bias") is None:
        return (
            f"config_A_B='none' trains nothing at {site.name!r}: it has no bias, so config_C "
            "and config_D_E (which change the bias) have nothing to act on; set config_A_B"
        )
    return None


def _identity(cfg: GloraConfig) -> bool:
    return cfg.init_weights


METHOD = Method(
    id="glora",
    refuses="configs that train nothing at a site (config_A_B='none' where there is no bias)",
    family="reparameterized",
    config=GloraConfig,
    build=_build,
    num_parameters=_count,
    formula="per projection (k: kernel elements, 1 for Linear): A and B: 2·r·(d_out + d_in·k) "
    "(lora), 2·d_out (vector), 2 (constant); with a bias, C: r·(d_in·k + 1) (lora) or d_in·k "
    "(vector), D and E: 2·d_out (vector) or 2 (constant)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=_identity,
    paper="Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, "
    "2023, arXiv:2306.07967",
    summary="W' = W + W ⊙ A + B, b' = b + b ⊙ D + E + W C with low-rank, vector or scalar "
    "supports; mergeable",
    size_check=_size_check,
)
