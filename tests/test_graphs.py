"""GraphedStep: a training step captured as one CUDA graph trains as eager steps do."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

import unipeft
from unipeft.contract.errors import UnipeftError
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb
from unipeft.training import GraphedStep

TARGETS = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down"]


def _loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"]).last_hidden_state.float().square().mean()


def test_an_optimizer_that_is_not_capturable_is_refused_with_the_fix() -> None:
    model = unipeft.apply(BACKBONES["llama"].make(), "lora", r=2, targets=TARGETS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(UnipeftError, match="capturable=True"):
        GraphedStep(model, opt, {"input_ids": torch.zeros(2, 5, dtype=torch.long)}, _loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_without_cuda_the_error_says_so() -> None:
    model = unipeft.apply(BACKBONES["llama"].make(), "lora", r=2, targets=TARGETS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, capturable=True)
    with pytest.raises(UnipeftError, match="needs a CUDA device"):
        GraphedStep(model, opt, {"input_ids": torch.zeros(2, 5, dtype=torch.long)}, _loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_train_exactly_like_eager_steps() -> None:
    """SGD, whose update is linear in the gradient, so rounding differences between the
    kernels chosen under capture and eagerly stay at rounding level (Adam's normalised
    update would amplify them in near-zero gradient entries)."""
    bb = BACKBONES["llama"]
    models = []
    for _ in range(2):
        torch.manual_seed(40)
        m = unipeft.apply(bb.make(), "lora", r=2, targets=TARGETS).cuda().train()
        perturb(m, seed=41)
        models.append(m)
    eager_model, graph_model = models
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    eager_opt = torch.optim.SGD(params[0], lr=0.1, momentum=0.9)
    graph_opt = torch.optim.SGD(params[1], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(42)
    batches = [{"input_ids": torch.randint(0, 100, (4, 7), generator=gen).cuda()} for _ in range(6)]
    step = GraphedStep(graph_model, graph_opt, batches[0], _loss, warmup=2)
    for _ in range(2):  # the warm-up steps GraphedStep took on batches[0]
        eager_opt.zero_grad(set_to_none=True)
        _loss(eager_model, batches[0]).backward()
        eager_opt.step()
    for batch in batches[1:]:
        eager_opt.zero_grad(set_to_none=True)
        loss = _loss(eager_model, batch)
        loss.backward()
        eager_opt.step()
        torch.testing.assert_close(step(batch), loss.detach(), atol=1e-5, rtol=1e-4)
    for a, b in zip(params[0], params[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(UnipeftError, match="drop or pad"):
        step({"input_ids": batches[1]["input_ids"][:3]})
    with pytest.raises(UnipeftError, match="same keys"):
        step({"ids": batches[1]["input_ids"]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_adamw_steps_run_the_optimizer_on_every_replay() -> None:
    """AdamW with capturable=True inside the graph: its step count (a GPU tensor) advances
    once per replay and the factors move."""
    bb = BACKBONES["llama"]
    torch.manual_seed(43)
    model = unipeft.apply(bb.make(), "lora", r=2, targets=TARGETS).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)
    batch = {"input_ids": torch.randint(0, 100, (4, 7)).cuda()}
    step = GraphedStep(model, opt, batch, _loss, warmup=3)
    before = [p.detach().clone() for p in params]
    losses = torch.stack([step(batch) for _ in range(20)])
    assert torch.isfinite(losses).all()
    assert all(int(opt.state[p]["step"].item()) == 3 + 20 for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
