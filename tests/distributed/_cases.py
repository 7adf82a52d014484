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
    # float32 adapters beside a bfloat16 backbone, in one FSDP unit with the embeddings
    "lora@bf16": {"r": 4, "targets": ["attn.q", "attn.v", "mlp.down"]},
}
# bfloat16 sums differ with how the batch is split, and AdamW turns small gradient
# differences into sign-sized ones: there the update (trained - initial) is compared, relative
UPDATE_RTOL = {"lora@bf16": 0.15}
LOSS_RTOL = {"lora@bf16": 1e-2}
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
    base = backbone()
    if method.endswith("@bf16"):
        base = base.to(torch.bfloat16)
    m = unipeft.apply(base, method.split("@")[0], **CASES[method])
    m.deltas.float()  # the adapters in float32 (a no-op on a float32 backbone)
    return perturbed(m)


def perturbed(m: unipeft.DeltaModel) -> unipeft.DeltaModel:
    """``m`` with every trainable tensor moved off its initial value by seeded noise (so no
    delta starts as zeros and every update is compared on a non-trivial adapter)."""
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
    again = unipeft.load(backbone(), str(folder))  # what every rank reloads: float32 backbone
    with torch.no_grad():
        after = float(again(input_ids=ids, labels=ids).loss)
    return losses, after


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unipeft_adapters.safetensors"))


# ------------------------------------------------- unipeft.training.Trainer on these cases

TRAIN_EXAMPLES, TRAIN_STEPS = 8, 3  # two global batches an epoch: the runs cross an epoch


def train_data() -> list[torch.Tensor]:
    """Examples for the Trainer: each a row of token ids (the default collate stacks them)."""
    g = torch.Generator().manual_seed(3)
    return list(torch.randint(0, 96, (TRAIN_EXAMPLES, LENGTH), generator=g))


def lm_loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return m(input_ids=ids, labels=ids).loss


def eval_loss(m: torch.nn.Module) -> dict[str, float]:
    ids = batch().to(next(m.parameters()).device)
    return {"eval_loss": float(m(input_ids=ids, labels=ids).loss)}


def trainer_run(method: str, out: Path, steps: int = TRAIN_STEPS, resume: bool = False,
                device: str = "cpu", **trainer: object) -> object:  # fmt: skip
    """Train ``method`` with unipeft's Trainer (global batch GLOBAL_BATCH, evaluated on
    :func:`batch` every step) into ``out``; the TrainResult."""
    from unipeft.training import Trainer, TrainerConfig

    cfg = TrainerConfig(steps=steps, lr=LR, batch_size=GLOBAL_BATCH, device=device, log_every=1,
                        eval_every=1, **trainer)  # fmt: skip
    t = Trainer(model(method), lm_loss, train_data(), cfg, output_dir=out, eval_fn=eval_loss,
                progress=False)  # fmt: skip
    result = t.train(resume=resume)
    result.ranks = t.ranks  # type: ignore[attr-defined]
    return result


def saved_initial(method: str, like: Path) -> dict[str, torch.Tensor]:
    """The untrained values of the tensors saved in ``like`` (``adapter::site::method.param``)."""
    m = model(method)
    out = {}
    for key in saved(like):
        adapter, site, rest = key.split("::")
        out[key] = m.get_adapter(adapter).delta_at(site).state_dict()[rest.split(".", 1)[1]]
    return out


def one_step(m: torch.nn.Module, ids: torch.Tensor) -> None:
    """One SGD step of the causal-LM loss on ``ids``: the update is the gradient itself, so
    ranks and one process agree to rounding. (Not the load-balancing aux losses of the
    mixture methods: those are products of batch statistics, so each rank's loss on its
    own samples is not the loss on the global batch, as in any per-device balancing.)"""
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
