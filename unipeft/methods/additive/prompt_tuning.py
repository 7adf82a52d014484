"""Prompt tuning: learned soft tokens inserted into the token sequence (Lester et al., 2021).

On text models the attention mask is extended; on ViT and CLIP image towers the tokens go
after the class token, which is VPT-shallow (Jia et al., 2022). The tokens are removed from
the backbone's outputs again, so output shapes do not change.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import SequenceSite, Site


class PromptTuningConfig(DeltaConfig):
    num_tokens: int = Field(10, ge=1, le=1024, description="soft tokens per sequence")
    init: Literal["normal", "uniform", "vocab"] = Field(
        "normal",
        description="normal(0, init_std); uniform(-init_std, init_std); vocab: copies of "
        "random rows of the input embedding matrix where the site has one (else normal)",
    )
    init_std: float = Field(0.02, gt=0, le=10, description="scale of the random init")
    seed: int | None = Field(None, description="seed for the vocab row choice (None: global RNG)")


class PromptTuningDelta(AdditiveDelta):
    """``P`` soft tokens of width ``D``: ``tokens(N) -> (N, P, D)``."""

    def __init__(self, num_tokens: int, features: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(num_tokens, features))

    def tokens(self, batch_size: int) -> Tensor:
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)


def build_prompt(cfg: PromptTuningConfig, site: Site) -> PromptTuningDelta:
    """The prompt delta for ``site``, initialised as ``cfg`` says (hybrids build theirs so)."""
    assert isinstance(site, SequenceSite)
    delta = PromptTuningDelta(cfg.num_tokens, site.features)
    emb = getattr(site.embedding, "weight", None)
    with torch.no_grad():
        if cfg.init == "vocab" and emb is not None and emb.shape[-1] == site.features:
            gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
            rows = torch.randint(0, emb.shape[0], (cfg.num_tokens,), generator=gen)
            delta.prompt.copy_(emb.detach()[rows.to(emb.device)].float())
        elif cfg.init == "uniform":
            delta.prompt.uniform_(-cfg.init_std, cfg.init_std)
        else:
            delta.prompt.normal_(0.0, cfg.init_std)
    return delta


def _count(cfg: PromptTuningConfig, site: Site) -> int:
    assert isinstance(site, SequenceSite)
    return cfg.num_tokens * site.features


def tokens_refusal(field: str, count: int, site: Site) -> str | None:
    """Why ``count`` soft tokens (config field ``field``) do not fit ``site``'s position
    table, or None: at least one position must stay free for the input itself."""
    if not isinstance(site, SequenceSite) or site.max_length is None or count < site.max_length:
        return None
    return (
        f"{field}={count} soft tokens do not fit: the sequence holds at most "
        f"{site.max_length} positions (its position table), soft tokens included, so "
        f"{field} must be <= {site.max_length - 1} to leave room for the input"
    )


def _fits(cfg: PromptTuningConfig, site: Site) -> str | None:
    return tokens_refusal("num_tokens", cfg.num_tokens, site)


METHOD = Method(
    id="prompt_tuning",
    family="additive",
    config=PromptTuningConfig,
    build=build_prompt,
    num_parameters=_count,
    formula="P · D per token sequence (P: num_tokens, D: hidden width)",
    site_kinds=("sequence",),
    default_targets=("tokens",),
    budget_field="num_tokens",
    mergeable=False,
    identity_at_init=False,
    paper="Lester et al., The Power of Scale for Parameter-Efficient Prompt Tuning, 2021, "
    "arXiv:2104.08691; Jia et al., Visual Prompt Tuning, 2022, arXiv:2203.12119",
    summary="soft tokens in the input sequence (VPT-shallow on vision towers)",
    size_check=_fits,
)
