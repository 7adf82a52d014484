"""The LoRA fast paths on CUDA: the fused node, block slices and masked mixed batches give
the CPU's values and gradients, and a training step captured as a CUDA graph trains as
eager steps do (``tests/test_fast_paths.py`` checks the same paths on the CPU)."""

from __future__ import annotations

import pytest
import torch
from _matrix import backbones
from _matrix import projection_roles as all_linear

import unipeft
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", backbones())
def test_fast_paths_on_cuda_match_the_cpu(name: str) -> None:
    """Fused Linear node (training and inference), block slices and masked mixed batches
    on the GPU give the CPU's values and gradients (fp32)."""
    bb = BACKBONES[name]
    models = []
    for _ in range(2):
        torch.manual_seed(20)
        m = unipeft.apply(bb.make(), "lora", r=3, targets=all_linear(name), adapter_name="a")
        m.add_adapter("b", "lora", r=2, targets=all_linear(name))
        perturb(m, seed=21, adapter="a")
        perturb(m, seed=22, adapter="b")
        models.append(m)
    cpu, gpu = models[0], models[1].cuda()
    inputs = bb.sample(seed=23)
    to_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    tol = {"atol": 2e-4, "rtol": 2e-4}
    with torch.no_grad():
        torch.testing.assert_close(bb.run(gpu, to_gpu).cpu(), bb.run(cpu, inputs), **tol)
        with cpu.mixed_batch(["b", "a"]), gpu.mixed_batch(["b", "a"]):
            torch.testing.assert_close(bb.run(gpu, to_gpu).cpu(), bb.run(cpu, inputs), **tol)
    cpu.train()
    gpu.train()
    bb.run(cpu, inputs).square().sum().backward()
    bb.run(gpu, to_gpu).square().sum().backward()
    grads = dict(cpu.named_parameters())
    for n, p in gpu.named_parameters():
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(p.grad.cpu(), grads[n].grad, atol=2e-3, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_lora_training_step_captured_as_a_cuda_graph_equals_eager() -> None:
    """The fused node, the hosts and AdamW(capturable) run inside one CUDA graph: replaying
    it trains exactly as eager steps do."""
    bb = BACKBONES["llama"]
    models = []
    for _ in range(2):
        torch.manual_seed(30)
        m = unipeft.apply(bb.make(), "lora", r=2, targets=all_linear("llama")).cuda().train()
        perturb(m, seed=31)
        models.append(m)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in bb.sample(seed=32).items()}

    def stepper(m: unipeft.DeltaModel) -> tuple:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], capturable=True)

        def step() -> None:
            bb.run(m, inputs).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        return step, opt

    eager, _ = stepper(models[0])
    graphed, _opt = stepper(models[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            graphed()
            eager()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed()
    # capturing records the step without running it: both models have taken two steps
    for _ in range(4):
        eager()
        graph.replay()
    torch.cuda.synchronize()
    a = dict(models[0].deltas.named_parameters())
    for n, p in models[1].deltas.named_parameters():
        torch.testing.assert_close(p, a[n], atol=1e-5, rtol=1e-4)
