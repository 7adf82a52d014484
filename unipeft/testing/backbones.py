"""Tiny random backbones of every family the conformance kit covers.

Each :class:`TinyBackbone` builds a seeded model from a config (nothing is downloaded),
makes inputs, and turns the model's outputs into one flat tensor to compare.
Prototypes are built once per process and deep-copied, so a test gets a fresh model fast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyBackbone:
    name: str
    family: str  # "text" | "vit" | "clip"
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    outputs: Callable[[nn.Module, dict[str, Any]], list[Tensor]]
    """The model's outputs of interest, each with the batch as its first dimension."""

    def run(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Every output flattened into one tensor, for comparisons."""
        return torch.cat([t.flatten() for t in self.outputs(model, inputs)])

    def make(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        proto = _PROTOTYPES.get(self.name)
        if proto is None:
            with torch.random.fork_rng():  # seeded, without disturbing the caller's RNG
                torch.manual_seed(0)
                proto = _PROTOTYPES.setdefault(self.name, self.build().eval())
        model = copy.deepcopy(proto)
        return model.to(dtype) if dtype != torch.float32 else model

    def sample(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        return {
            k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in self.inputs(gen).items()
        }


_PROTOTYPES: dict[str, nn.Module] = {}
_H, _LAYERS, _HEADS, _FF, _VOCAB = 32, 2, 2, 64, 100


def _text_inputs(gen: torch.Generator) -> dict[str, Any]:
    ids = torch.randint(0, _VOCAB, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # one padded sequence, so mask handling is exercised
    return {"input_ids": ids, "attention_mask": mask}


def _image_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {"pixels": torch.randn(2, 3, 32, 32, generator=gen)}


def _hf_text_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    parts = [out.last_hidden_state]
    if getattr(out, "pooler_output", None) is not None:
        parts.append(out.pooler_output)
    return parts


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            hidden_size=_H,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_FF,
            vocab_size=_VOCAB,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(
        GPT2Config(
            n_embd=_H,
            n_layer=_LAYERS,
            n_head=_HEADS,
            vocab_size=_VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(
        LlamaConfig(
            hidden_size=_H,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=1,
            intermediate_size=_FF,
            vocab_size=_VOCAB,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(
        ViTConfig(
            hidden_size=_H,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_FF,
            image_size=32,
            patch_size=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _hf_vit_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    out = model(pixel_values=inputs["pixels"])
    return [out.last_hidden_state, out.pooler_output]


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=_H,
        depth=_LAYERS,
        num_heads=_HEADS,
        num_classes=5,
    )


def _timm_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    feats = model.forward_features(inputs["pixels"])
    return [feats, model.forward_head(feats)]


def _open_clip() -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(
            layers=_LAYERS, width=_H, head_width=16, patch_size=8, image_size=32
        ),
        text_cfg=CLIPTextCfg(
            context_length=12, vocab_size=_VOCAB, width=_H, heads=_HEADS, layers=_LAYERS
        ),
    )


def _clip_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {
        "pixels": torch.randn(2, 3, 32, 32, generator=gen),
        "text": torch.randint(1, _VOCAB, (2, 12), generator=gen),
    }


def _clip_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    return [model.encode_image(inputs["pixels"]), model.encode_text(inputs["text"])]


BACKBONES: dict[str, TinyBackbone] = {
    b.name: b
    for b in (
        TinyBackbone("bert", "text", _bert, _text_inputs, _hf_text_run),
        TinyBackbone("gpt2", "text", _gpt2, _text_inputs, _hf_text_run),
        TinyBackbone("llama", "text", _llama, _text_inputs, _hf_text_run),
        TinyBackbone("hf_vit", "vit", _hf_vit, _image_inputs, _hf_vit_run),
        TinyBackbone("timm_vit", "vit", _timm_vit, _image_inputs, _timm_run),
        TinyBackbone("open_clip", "clip", _open_clip, _clip_inputs, _clip_run),
    )
}
"""Every tiny backbone, by name. Families: text (BERT, GPT-2, Llama), vit (HF ViT, timm
ViT with fused qkv), clip (open_clip CLIP, both towers, ``nn.MultiheadAttention``)."""
