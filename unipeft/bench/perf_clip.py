"""The open_clip section of ``unipeft bench perf``: LoRA on the image tower's
``nn.MultiheadAttention`` against the plain tower, both libraries.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import unipeft

from .perf_report import _ratio
from .perf_setup import (
    PerfConfig,
    Progress,
    _free,
    _randomise,
    _trainable,
    require_peft,
    time_interleaved,
)


def _clip_tower(cfg: PerfConfig) -> tuple[nn.Module, dict[str, Any]]:
    from unipeft.demo.models import ClipImageTower

    torch.manual_seed(cfg.seed)
    if cfg.clip_model is not None:
        import open_clip

        clip = open_clip.create_model(cfg.clip_model, pretrained=None)
        label = cfg.clip_model
        source = f"open_clip.create_model({cfg.clip_model!r}, pretrained=None).visual"
    else:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        assert cfg.clip_vision is not None
        clip = CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(**cfg.clip_vision),
            text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        )
        label = "small CLIP image tower"
        source = f"open_clip CLIP(vision_cfg=CLIPVisionCfg(**{cfg.clip_vision})).visual"
    tower = ClipImageTower(clip.visual).to(device=cfg.device, dtype=cfg.dtype).eval()
    del clip
    return tower, {"model": label, "source": source, "batch": cfg.clip_batch}


def _clip_section(
    cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """LoRA on the image tower's attention (q, k, v slices of in_proj, and out_proj)."""
    dev = cfg.device
    base, describe = _clip_tower(cfg)
    size = base.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    pixels = torch.randn(cfg.clip_batch, 3, size, size, generator=gen)
    pixels = pixels.to(device=dev, dtype=cfg.dtype)
    um = unipeft.apply(
        copy.deepcopy(base),
        "lora",
        r=cfg.rank,
        alpha=cfg.alpha,
        targets=["visual/attn.q", "visual/attn.k", "visual/attn.v", "visual/attn.out"],
    ).eval()
    _randomise(um, "default", cfg.seed)
    variants: dict[str, Callable[[], Any]] = {}
    note = None
    peft_trainable = None
    try:
        peft = require_peft()
        pm = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                target_modules=r"visual\.transformer\.resblocks\.\d+\.attn",
            ),
        ).eval()
        peft_trainable = _trainable(pm)
        with torch.no_grad():
            pm(pixels[:1])  # fail here, not in the timing loop
    except Exception as exc:
        note = f"PEFT could not adapt nn.MultiheadAttention: {type(exc).__name__}: {exc}"
        pm = None

    def forward(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(pixels)

        return run

    variants = {"base": forward(base), "unipeft": forward(um)}
    if pm is not None:
        variants["peft"] = forward(pm)
    progress(f"open_clip: timing the image tower at batch {cfg.clip_batch}")
    ms = time_interleaved(
        variants,
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault("open_clip", {}),
    )
    fig = {
        "what": "open_clip image tower, LoRA r=16 on attention q, k, v (slices of the MHA's "
        "in_proj) and out_proj, no_grad forward vs the plain tower",
        **describe,
        "base_ms": ms["base"],
        "unipeft_ms": ms["unipeft"],
        "peft_ms": ms.get("peft"),
        "unipeft_to_base": _ratio(ms["unipeft"], ms["base"]),
        "peft_to_base": _ratio(ms.get("peft"), ms["base"]),
        "unipeft_to_peft": _ratio(ms["unipeft"], ms.get("peft")),
        "unipeft_trainable": _trainable(um),
        "peft_trainable": peft_trainable,
        "peft_targets": "the nn.MultiheadAttention modules (PEFT puts one LoRA on the fused "
        "in_proj and one on out_proj, so its parameter count differs)",
    }
    if note:
        fig["note"] = note
    del base, um, pm, variants
    _free(dev)
    return {"open_clip_mha_lora": fig}
