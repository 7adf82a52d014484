"""What the multi-process tests train: a tiny Llama, one method of each family, a fixed
global batch, and the single-process reference the ranks must reproduce."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import unipeft

# one method of each family of the taxonomy (plus a soft prompt: the sequence host)
CASES: dict[str, dict] = {
    "lora": {"r": 4, "targets": ["attn.q", "attn.v", "mlp.down"]},  # reparameterized
    "bottleneck_adapter": {},  # additive, at module sites
    "prompt_tuning": {"num_tokens": 3},  # additive, at the token sequence
    # selective; not attn.k: a key bias shifts every score of a query alike, so softmax
    # gives it a zero gradient, and AdamW turns that gradient's rounding noise into full steps
    "bitfit": {"targets": ["attn.q", "attn.v", "attn.out", "mlp.up", "mlp.down"]},
    "mam_adapter": {},  # hybrid
    "moe_lora": {"num_experts": 2, "r": 2},  # mixture of experts
}
GLOBAL_BATCH, LENGTH, STEPS, LR = 4, 8, 3, 5e-2


def backbone() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def model(method: str) -> unipeft.DeltaModel:
    """The same adapted model in every process: seeded backbone, seeded adapter, and every
    trainable tensor moved off its initial value (so no delta starts as zeros)."""
    m = unipeft.apply(backbone(), method, **CASES[method])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 96, (GLOBAL_BATCH, LENGTH), generator=g)


def steps(m: torch.nn.Module, ids: torch.Tensor) -> Iterator[float]:
    """AdamW steps of the causal-LM loss on ``ids``; yields each step's loss."""
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield float(loss.detach())


def reference(method: str, folder: Path) -> tuple[list[float], float]:
    """Train in this process on the whole global batch and save to ``folder``: the losses
    and the trained model's loss on the batch (what a rank's reloaded copy must give)."""
    m = model(method)
    ids = batch()
    losses = list(steps(m, ids))
    m.save(str(folder))
    with torch.no_grad():
        after = float(m(input_ids=ids, labels=ids).loss)
    return losses, after


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unipeft_adapters.safetensors"))
