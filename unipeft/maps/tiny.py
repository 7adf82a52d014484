"""Tiny random backbones: seeded models small enough to test every method on in seconds.

A :class:`TinyBackbone` is what the ``register_tiny_backbones`` hook takes. The registry
holds every registered one by name, and three tools use them: the conformance kit
(``pytest --unipeft-conformance ID --unipeft-backbones NAME``), the CLI's ``tiny:<name>``
model spec, and the tests (``unipeft.testing.backbones.BACKBONES``). unipeft registers the
seven below through its own plugin, one per built-in structure map; a plugin that ships a
structure map registers a tiny model of its architecture the same way, so that the kit
runs every method on it.
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
    """A tiny seeded random model, the inputs to run it on, and the outputs to compare.

    Fields, in constructor order:

    ``name``
        Unique among registered tiny backbones (a duplicate is an error naming both
        distributions). It is what ``--unipeft-backbones`` and ``tiny:<name>`` accept.
    ``family``
        What kind of inputs the model takes, for people: ``"text"``, ``"vit"``, ``"clip"``,
        ``"video"``, or a word of your own.
    ``build``
        ``() -> nn.Module``: a new model with random weights, built from a config (never
        downloaded). It is called once per process, under ``torch.manual_seed(0)``;
        :meth:`make` returns copies of that prototype. Keep it tiny (two blocks of width 32)
        and without dropout.
    ``inputs``
        ``(torch.Generator) -> dict``: a batch of inputs drawn with the generator (tensors
        and anything else ``outputs`` needs). The batch should have at least two samples:
        the mixed-batch invariant gives each sample its own adapter.
    ``outputs``
        ``(model, inputs) -> list[Tensor]``: run the model and return the outputs to
        compare, each with the batch as its first dimension.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    outputs: Callable[[nn.Module, dict[str, Any]], list[Tensor]]

    def run(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Every output flattened into one tensor, for comparisons."""
        return torch.cat([t.flatten() for t in self.outputs(model, inputs)])

    def make(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh copy of the prototype (built on first use, seeded), in eval mode."""
        proto = _PROTOTYPES.get(self)
        if proto is None:
            with torch.random.fork_rng():  # seeded, without disturbing the caller's RNG
                torch.manual_seed(0)
                proto = _PROTOTYPES.setdefault(self, self.build().eval())
        model = copy.deepcopy(proto)
        return model.to(dtype) if dtype != torch.float32 else model

    def sample(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The inputs drawn with ``seed``; floating tensors cast to ``dtype``."""
        gen = torch.Generator().manual_seed(seed)
        return {
            k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in self.inputs(gen).items()
        }


_PROTOTYPES: dict[TinyBackbone, nn.Module] = {}
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


def _videomae() -> nn.Module:
    from transformers import VideoMAEConfig, VideoMAEModel

    return VideoMAEModel(
        VideoMAEConfig(
            hidden_size=_H,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_FF,
            image_size=32,
            patch_size=8,
            num_frames=2,
            tubelet_size=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _video_inputs(gen: torch.Generator) -> dict[str, Any]:
    return {"frames": torch.randn(2, 2, 3, 32, 32, generator=gen)}  # (N, T, C, H, W)


def _videomae_run(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    return [model(pixel_values=inputs["frames"]).last_hidden_state]


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


BUILTIN_TINY_BACKBONES: tuple[TinyBackbone, ...] = (
    TinyBackbone("bert", "text", _bert, _text_inputs, _hf_text_run),
    TinyBackbone("gpt2", "text", _gpt2, _text_inputs, _hf_text_run),
    TinyBackbone("llama", "text", _llama, _text_inputs, _hf_text_run),
    TinyBackbone("hf_vit", "vit", _hf_vit, _image_inputs, _hf_vit_run),
    TinyBackbone("timm_vit", "vit", _timm_vit, _image_inputs, _timm_run),
    TinyBackbone("open_clip", "clip", _open_clip, _clip_inputs, _clip_run),
    TinyBackbone("videomae", "video", _videomae, _video_inputs, _videomae_run),
)
"""The tiny backbones unipeft registers: text (BERT, GPT-2 with fused ``Conv1D``
attention, Llama with one key/value head), vit (Hugging Face ViT, timm ViT with fused
``qkv``), clip (open_clip CLIP, both towers, ``nn.MultiheadAttention``) and video
(VideoMAE, whose blocks keep the ``attention.attention.query`` layout of transformers 4)."""
