"""VPT-Deep: new learned prompt tokens at the input of every transformer block of a vision
tower (Jia et al., 2022).

What it computes: block ``i`` of a ViT (or of a CLIP image tower) gets its own ``P`` prompts
``Pᵢ`` (``P × D``), inserted after the class token, ``[x_cls, Pᵢ, E]``; the block's outputs at
the prompt positions are discarded, so block ``i + 1`` sees ``[x'_cls, Pᵢ₊₁, E']``, with its
own new prompts in their place, and nothing of ``Pᵢ``'s outputs but what attention mixed
into the real tokens. After the last block only the real tokens remain, so the head and
the output shapes are the backbone's. Optionally the prompts pass through dropout in
training (the paper's prompt dropout). With prompts in the first block only this is
VPT-Shallow, which is ``prompt_tuning`` at the ``tokens`` site.

The mechanism is the per-block token sequence of the structure maps (role
``layer_tokens``, sites named ``<block>:tokens``): a ``"container"`` site whose soft tokens
enter the block's input and leave with its output. One delta per block; nothing is shared.

Paper: Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, *Visual Prompt Tuning*, ECCV 2022,
arXiv:2203.12119 (the "deep" variant). The paper initialises the prompts uniformly in
``±sqrt(6 / (3·p² + D))`` (Xavier with the patch embedding's fan-in, patch size ``p``);
``init="xavier"`` here uses ``±sqrt(6 / (fan_in + D))`` with ``fan_in`` given by
``init_fan_in`` (default 3·16² = 768, a 16-pixel patch), ``init="normal"`` draws
``N(0, init_std)``.

PEFT equivalent: none (PEFT's prompt methods act on text models' input or key/value cache).

Site kinds: only the per-block token sequences (``layer_tokens``) of image towers: ViTs
(timm, Hugging Face), VideoMAE and open_clip's image tower. Refused, each with the reason:
module sites (it adds tokens); the model-level ``tokens`` sequence (VPT-Shallow is
``prompt_tuning``); the ``layer_tokens`` of open_clip's text tower (this is visual prompt
tuning; deep text prompts are ``prompt_tuning`` with ``targets=["text/layer_tokens"]``).
Hugging Face text models have no per-block token sequence, so the default targets match
nothing there and ``apply`` names the roles they have.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import SequenceSite, Site


class VPTDeepConfig(DeltaConfig):
    num_tokens: int = Field(10, ge=1, le=1024, description="prompt tokens P per block")
    init: Literal["xavier", "normal"] = Field(
        "xavier",
        description="xavier: uniform in ±sqrt(6 / (init_fan_in + D)), as the paper; normal: "
        "N(0, init_std)",
    )
    init_fan_in: int = Field(
        768,
        ge=1,
        le=1 << 20,
        description="fan-in of the xavier bound: the patch embedding's 3·patch² (768 for 16 px)",
    )
    init_std: float = Field(0.02, gt=0, le=10, description="standard deviation for init=normal")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the prompts in training (prompt dropout)"
    )


class DeepPromptDelta(AdditiveDelta):
    """One block's ``P`` prompts of width ``D``: ``tokens(N) -> (N, P, D)``."""

    def __init__(self, cfg: VPTDeepConfig, features: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(cfg.num_tokens, features))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if cfg.init == "xavier":
                bound = math.sqrt(6.0 / (cfg.init_fan_in + features))
                self.prompt.uniform_(-bound, bound)
            else:
                self.prompt.normal_(0.0, cfg.init_std)

    def tokens(self, batch_size: int) -> Tensor:
        return self.dropout(self.prompt.unsqueeze(0).expand(batch_size, -1, -1))


def _build(cfg: VPTDeepConfig, site: Site) -> DeepPromptDelta:
    assert isinstance(site, SequenceSite)
    return DeepPromptDelta(cfg, site.features)


def _count(cfg: VPTDeepConfig, site: Site) -> int:
    assert isinstance(site, SequenceSite)
    return cfg.num_tokens * site.features


def _accepts(cfg: VPTDeepConfig, site: Site) -> str | None:
    if not isinstance(site, SequenceSite):  # pragma: no cover - site_kinds refuses it first
        return f"vpt_deep adds prompt tokens; {site.name!r} is not a token sequence"
    if site.role != "layer_tokens":
        return (
            f"vpt_deep puts new prompts into every block's token sequence (role "
            f"'layer_tokens'), and {site.name!r} is the {site.role or 'unnamed'} sequence of a "
            "whole stack; target 'layer_tokens', or use prompt_tuning for prompts at the "
            "input only (VPT-Shallow)"
        )
    if site.tower == "text":
        return (
            f"vpt_deep is visual prompt tuning, and {site.name!r} is in the text tower; target "
            "'visual/layer_tokens', or use prompt_tuning with targets=['text/layer_tokens'] "
            "for deep text prompts"
        )
    return None


METHOD = Method(
    id="vpt_deep",
    family="additive",
    config=VPTDeepConfig,
    build=_build,
    num_parameters=_count,
    formula="P · D per block (P: num_tokens, D: width); N · P · D for N blocks",
    site_kinds=("sequence",),
    accepts=_accepts,
    # every block's sequence; on CLIP the text tower's are skipped (refused, optional target)
    default_targets=("layer_tokens?",),
    budget_field="num_tokens",
    mergeable=False,
    identity_at_init=False,
    paper="Jia et al., Visual Prompt Tuning, ECCV 2022, arXiv:2203.12119 (VPT-Deep)",
    summary="new prompt tokens at the input of every block of a vision tower (VPT-Deep)",
    refuses="module sites; the model-level 'tokens' sequence (that is prompt_tuning); the "
    "text tower of CLIP; backbones without per-block token sequences (text models)",
)
