"""P-tuning: soft tokens produced by a small prompt encoder (Liu et al., 2021).

What it computes, at one token sequence of width ``D`` with ``P`` virtual tokens: a table
``E`` of ``P`` learned input embeddings (``P × D``) is passed through a prompt encoder, and
its outputs ``T = f(E)`` (``P × D``) are the soft tokens inserted into the sequence (and
stripped from the outputs again), exactly where :mod:`prompt_tuning` puts its tokens. The
encoder reparameterises the prompts (it eases their optimisation); it runs on every
forward pass, and only its outputs ever reach the backbone:

- ``encoder="mlp"``: ``f(E) = W₃ relu(W₂ relu(W₁ E + b₁) + b₂) + b₃`` with hidden width
  ``H`` (``encoder_hidden_size``, default ``D``); always three linear layers, so
  ``encoder_num_layers`` and ``encoder_dropout`` do not apply (as in PEFT);
- ``encoder="lstm"``: a bidirectional LSTM of ``encoder_num_layers`` layers and hidden
  width ``H`` (dropout ``encoder_dropout`` between its layers) over the ``P`` embeddings,
  then ``W₂ relu(W₁ h + b₁) + b₂`` from ``2H`` through ``2H`` to ``D``;
- ``inference_mode=True``: no encoder, ``T = E``: the table holds the encoder's outputs
  (what a trained P-tuning adapter reduces to, and what a PEFT folder stores).

Paper: Liu, Zheng, Du, Ding, Qian, Yang, Tang, *GPT Understands, Too*, 2021,
arXiv:2103.10385.

Shared across sites: nothing; each targeted sequence has its own table and encoder.

PEFT equivalent: ``peft_type="P_TUNING"`` (``PromptEncoderConfig``). ``num_virtual_tokens``
→ ``num_tokens``, ``encoder_reparameterization_type`` (``MLP``/``LSTM``) → ``encoder``,
``encoder_hidden_size`` (``None``: the token width) → ``encoder_hidden_size``,
``encoder_num_layers`` / ``encoder_dropout`` → the same names, PEFT's ``inference_mode`` →
``inference_mode``. PEFT saves only the encoder's outputs (``prompt_embeddings``, ``P × D``),
never the encoder, so :func:`unipeft.interop.peft.load` gives an adapter with
``inference_mode=True`` and :func:`unipeft.interop.peft.save` writes ``f(E)`` (computed in
eval mode). PEFT prepends its tokens at position 0 of a Hugging Face text model and keeps
them in its outputs; unipeft puts them at the ``tokens`` site's index (0 on decoders, 1 after
``[CLS]`` on BERT-like encoders) and strips them.

Site kinds: token sequences only (``tokens``, and the per-block ``layer_tokens`` of vision
towers); every module site is refused because the method adds tokens, not a function of a
module's output. A sequence whose position table cannot hold ``num_tokens`` more positions
is refused by the size check.
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
from .prompt_tuning import tokens_refusal


class PTuningConfig(DeltaConfig):
    num_tokens: int = Field(10, ge=1, le=1024, description="virtual (soft) tokens per sequence")
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp",
        description="the prompt encoder (PEFT's encoder_reparameterization_type): mlp, three "
        "linear layers with ReLU; lstm, a bidirectional LSTM then a two-layer MLP",
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, le=65536, description="hidden width H of the encoder (None: the token width D)"
    )
    encoder_num_layers: int = Field(
        2, ge=1, le=16, description="LSTM layers (lstm only; the mlp encoder has three layers)"
    )
    encoder_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers in training (lstm only)"
    )
    inference_mode: bool = Field(
        False,
        description="hold only the encoder's outputs (P x D, used as the tokens directly), as "
        "PEFT does for an adapter loaded for inference; what interop.peft.load gives",
    )


class PromptEncoderDelta(AdditiveDelta):
    """``P`` embeddings through a prompt encoder: ``tokens(N) -> (N, P, D)``.

    Parameters: ``embedding`` (P, D); with an encoder, ``lstm`` (an ``nn.LSTM``, lstm only)
    and ``mlp`` (an ``nn.Sequential`` of linear layers and ReLUs)."""

    def __init__(self, cfg: PTuningConfig, features: int) -> None:
        super().__init__()
        d = features
        h = cfg.encoder_hidden_size or d
        self.embedding = nn.Parameter(torch.empty(cfg.num_tokens, d))
        nn.init.normal_(self.embedding)  # as nn.Embedding (PEFT's table) starts
        self.lstm: nn.LSTM | None = None
        self.mlp: nn.Sequential | None = None
        if cfg.inference_mode:
            return
        if cfg.encoder == "lstm":
            layers = cfg.encoder_num_layers
            self.lstm = nn.LSTM(
                input_size=d,
                hidden_size=h,
                num_layers=layers,
                # torch applies it between layers only, and warns for one layer
                dropout=cfg.encoder_dropout if layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )

    def prompts(self) -> Tensor:
        """The ``(P, D)`` soft tokens: the encoder's outputs for the embedding table."""
        x = self.embedding
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0][0]
        if self.mlp is not None:
            x = self.mlp(x)
        return x

    def tokens(self, batch_size: int) -> Tensor:
        return self.prompts().unsqueeze(0).expand(batch_size, -1, -1)


def _build(cfg: PTuningConfig, site: Site) -> PromptEncoderDelta:
    assert isinstance(site, SequenceSite)
    return PromptEncoderDelta(cfg, site.features)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _count(cfg: PTuningConfig, site: Site) -> int:
    assert isinstance(site, SequenceSite)
    d = site.features
    h = cfg.encoder_hidden_size or d
    table = cfg.num_tokens * d
    if cfg.inference_mode:
        return table
    if cfg.encoder == "mlp":
        return table + _linear(d, h) + _linear(h, h) + _linear(h, d)
    lstm = 0
    for layer in range(cfg.encoder_num_layers):
        n_in = d if layer == 0 else 2 * h
        lstm += 2 * (4 * h * n_in + 4 * h * h + 8 * h)  # two directions, two biases each
    return table + lstm + _linear(2 * h, 2 * h) + _linear(2 * h, d)


def _fits(cfg: PTuningConfig, site: Site) -> str | None:
    return tokens_refusal("num_tokens", cfg.num_tokens, site)


METHOD = Method(
    id="p_tuning",
    family="additive",
    config=PTuningConfig,
    build=_build,
    num_parameters=_count,
    formula="P·D (the embedding table) + the encoder: mlp, (D·H+H) + (H·H+H) + (H·D+D); "
    "lstm, Σ_layers 2·(4H·in + 4H·H + 8H) (in = D, then 2H) + (2H·2H+2H) + (2H·D+D); "
    "nothing with inference_mode (P: num_tokens, D: width, H: encoder_hidden_size or D)",
    site_kinds=("sequence",),
    default_targets=("tokens",),
    budget_field="num_tokens",
    mergeable=False,
    identity_at_init=False,
    paper="Liu et al., GPT Understands, Too, 2021, arXiv:2103.10385",
    summary="soft tokens produced by an MLP or LSTM prompt encoder (P-tuning; PEFT's P_TUNING)",
    size_check=_fits,
    refuses="module sites (it adds tokens to a sequence); more num_tokens than a sequence's "
    "position table leaves room for",
)
