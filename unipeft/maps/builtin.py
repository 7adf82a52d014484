"""The structure maps unipeft ships: Hugging Face text and ViT models, timm ViTs, open_clip.

They are registered through the ``register_backbones`` hook like any third party's map.
"""

from __future__ import annotations

from torch import nn

from ..contract.maps import BlockLayout, GenericMap, LayoutMap, Tower, output_features
from ..contract.sites import SequenceSite


def _hidden(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(size) if size else output_features(module)


def _hf_text_sequence(index: int):
    def build(model: nn.Module, prefix: str, tower: str | None) -> SequenceSite | None:
        base = model.get_submodule(prefix.rstrip(".")) if prefix else model
        get_emb = getattr(base, "get_input_embeddings", None)
        embedding = get_emb() if callable(get_emb) else None
        if embedding is None:
            return None
        return SequenceSite(
            name=f"{prefix}tokens",
            tower=tower,
            features=_hidden(base),
            insert=base,
            strip=base,
            index=index,
            style="hf_text",
            embedding=embedding,
            max_length=_position_table(base),
        )

    return build


_POSITION_TABLES = ("embeddings.position_embeddings", "wpe", "embed_positions")


def _position_table(base: nn.Module) -> int | None:
    """The size of a learned absolute position table (BERT's ``position_embeddings``,
    GPT-2's ``wpe``), which soft tokens pass through; ``None`` for rotary or no positions."""
    for path in _POSITION_TABLES:
        try:
            table = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings) - int(getattr(table, "offset", 0))
    return None


def _hf_vit_sequence(model: nn.Module, prefix: str, tower: str | None) -> SequenceSite | None:
    base = model.get_submodule(prefix.rstrip(".")) if prefix else model
    embeddings = getattr(base, "embeddings", None)
    if embeddings is None:
        return None
    return SequenceSite(
        name=f"{prefix}tokens",
        tower=tower,
        features=_hidden(base),
        insert=embeddings,
        strip=base,
        index=1,
        style="between",
        strip_output=True,
    )


def _timm_sequence(model: nn.Module, prefix: str, tower: str | None) -> SequenceSite | None:
    vit = model.get_submodule(prefix.rstrip(".")) if prefix else model
    norm_pre, norm = getattr(vit, "norm_pre", None), getattr(vit, "norm", None)
    if norm_pre is None or norm is None:
        return None
    return SequenceSite(
        name=f"{prefix}tokens",
        tower=tower,
        features=int(vit.embed_dim),
        insert=norm_pre,
        strip=norm,
        index=int(getattr(vit, "num_prefix_tokens", 1)),
        style="between",
    )


def _open_clip_sequence(index: int):
    def build(model: nn.Module, prefix: str, tower: str | None) -> SequenceSite | None:
        transformer = model.get_submodule(prefix + "transformer")
        return SequenceSite(
            name=f"{prefix}tokens",
            tower=tower,
            features=int(transformer.width),
            insert=transformer,
            strip=transformer,
            index=index,
            style="container",
            batch_first=bool(getattr(transformer, "batch_first", True)),
        )

    return build


BERT = LayoutMap(
    name="transformers-bert",
    description="Hugging Face BERT / RoBERTa / ELECTRA-style encoders",
    towers=(
        Tower(
            r"(?P<prefix>.*\.)?encoder\.layer",
            embed="embeddings.word_embeddings",
            sequence=_hf_text_sequence(index=1),
        ),
    ),
    layout=BlockLayout(
        projections={
            "attn.q": "attention.self.query",
            "attn.k": "attention.self.key",
            "attn.v": "attention.self.value",
            "attn.out": "attention.output.dense",
            "mlp.up": "intermediate.dense",
            "mlp.down": "output.dense",
        },
        sublayers={
            "attn": ("attention.self", "attention.output.dense"),
            "mlp": ("intermediate", "output.dense"),
        },
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
    ),
)

GPT2 = LayoutMap(
    name="transformers-gpt2",
    description="Hugging Face GPT-2 (fused c_attn Conv1D)",
    towers=(Tower(r"(?P<prefix>.*\.)?h", embed="wte", sequence=_hf_text_sequence(index=0)),),
    layout=BlockLayout(
        projections={
            "attn.q": ("attn.c_attn", 0, 3),
            "attn.k": ("attn.c_attn", 1, 3),
            "attn.v": ("attn.c_attn", 2, 3),
            "attn.out": "attn.c_proj",
            "mlp.up": "mlp.c_fc",
            "mlp.down": "mlp.c_proj",
        },
        sublayers={"attn": ("attn", "attn"), "mlp": ("mlp", "mlp")},
        norms=("ln_1", "ln_2"),
    ),
)

LLAMA = LayoutMap(
    name="transformers-llama",
    description="Hugging Face Llama-style decoders (Llama, Mistral, Qwen2, ...)",
    towers=(
        Tower(
            r"(?P<prefix>.*\.)?layers", embed="embed_tokens", sequence=_hf_text_sequence(index=0)
        ),
    ),
    layout=BlockLayout(
        projections={
            "attn.q": "self_attn.q_proj",
            "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj",
            "attn.out": "self_attn.o_proj",
            "mlp.gate": "mlp.gate_proj",
            "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj",
        },
        sublayers={"attn": ("self_attn", "self_attn"), "mlp": ("mlp", "mlp")},
        norms=("input_layernorm", "post_attention_layernorm"),
    ),
)

HF_VIT = LayoutMap(
    name="transformers-vit",
    description="Hugging Face ViT (q/k/v/o projections, transformers 5)",
    towers=(
        Tower(
            r"(?P<prefix>.*\.)?layers",
            embed="embeddings.patch_embeddings.projection",
            sequence=_hf_vit_sequence,
            layer_tokens=True,
        ),
    ),
    layout=BlockLayout(
        projections={
            "attn.q": "attention.q_proj",
            "attn.k": "attention.k_proj",
            "attn.v": "attention.v_proj",
            "attn.out": "attention.o_proj",
            "mlp.up": "mlp.fc1",
            "mlp.down": "mlp.fc2",
        },
        sublayers={"attn": ("attention", "attention"), "mlp": ("mlp", "mlp")},
        norms=("layernorm_before", "layernorm_after"),
    ),
)

HF_VIT_LEGACY = LayoutMap(
    name="transformers-vit-legacy",
    description="Hugging Face ViT (attention.attention.query layout, transformers 4)",
    towers=(
        Tower(
            r"(?P<prefix>.*\.)?encoder\.layer",
            embed="embeddings.patch_embeddings.projection",
            sequence=_hf_vit_sequence,
            layer_tokens=True,
        ),
    ),
    layout=BlockLayout(
        projections={
            "attn.q": "attention.attention.query",
            "attn.k": "attention.attention.key",
            "attn.v": "attention.attention.value",
            "attn.out": "attention.output.dense",
            "mlp.up": "intermediate.dense",
            "mlp.down": "output.dense",
        },
        sublayers={
            "attn": ("attention.attention", "attention.output.dense"),
            "mlp": ("intermediate", "output.dense"),
        },
        norms=("layernorm_before", "layernorm_after"),
    ),
)

TIMM_VIT = LayoutMap(
    name="timm-vit",
    description="timm VisionTransformer (fused qkv Linear, sliced per role)",
    towers=(
        Tower(
            r"(?P<prefix>.*\.)?blocks",
            embed="patch_embed.proj",
            sequence=_timm_sequence,
            layer_tokens=True,
        ),
    ),
    layout=BlockLayout(
        projections={
            "attn.q": ("attn.qkv", 0, 3),
            "attn.k": ("attn.qkv", 1, 3),
            "attn.v": ("attn.qkv", 2, 3),
            "attn.out": "attn.proj",
            "mlp.up": "mlp.fc1",
            "mlp.down": "mlp.fc2",
        },
        sublayers={"attn": ("attn", "attn"), "mlp": ("mlp", "mlp")},
        norms=("norm1", "norm2"),
    ),
)

_OPEN_CLIP_BLOCK = BlockLayout(
    projections={
        "attn.q": ("attn", 0, 3),
        "attn.k": ("attn", 1, 3),
        "attn.v": ("attn", 2, 3),
        "attn.out": "attn.out_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    },
    sublayers={"attn": ("attn", "attn"), "mlp": ("mlp", "mlp")},
    norms=("ln_1", "ln_2"),
)

OPEN_CLIP = LayoutMap(
    name="open_clip",
    description="open_clip CLIP, image and text towers (nn.MultiheadAttention, fused in_proj)",
    towers=(
        Tower(
            r"(?P<prefix>visual\.)transformer\.resblocks",
            name="visual",
            embed="conv1",
            sequence=_open_clip_sequence(index=1),
            layer_tokens=True,
        ),
        Tower(
            r"(?P<prefix>(?:text\.)?)transformer\.resblocks",
            name="text",
            embed="token_embedding",
            sequence=_open_clip_sequence(index=0),
            layer_tokens=True,
            requires="token_embedding",
        ),
        Tower(  # an image tower passed alone (clip.visual): its blocks sit at the root
            r"(?P<prefix>)transformer\.resblocks",
            name="visual",
            embed="conv1",
            sequence=_open_clip_sequence(index=1),
            layer_tokens=True,
            requires="conv1",
        ),
    ),
    layout=_OPEN_CLIP_BLOCK,
    priority=10,
)

BUILTIN_MAPS = (OPEN_CLIP, BERT, GPT2, LLAMA, HF_VIT, HF_VIT_LEGACY, TIMM_VIT, GenericMap())
