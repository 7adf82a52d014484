"""The backbones beyond transformers on a CUDA device: cuDNN's recurrent kernels run with
the effective weights the deltas make, Mamba's mixer with its directly-read weights swapped,
a ConvNet in channels-last memory under autocast; each against the same model on the CPU.

Run with ``pytest -m gpu`` on a machine with CUDA; the default run deselects these.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft
from unipeft.testing.backbones import BACKBONES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full float32 in cuDNN's convolutions and recurrent kernels (TF32 by default), so that
    CUDA is compared with the CPU at float32 tolerance."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _randomise(model: nn.Module, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


def _to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _pair(name: str, method: str, **config) -> tuple:
    """The same adapter on the CPU and on CUDA: ``(backbone, cpu model, cuda model)``."""
    bb = BACKBONES[name]
    cpu = unipeft.apply(bb.make(), method, **config)
    _randomise(cpu)
    gpu = unipeft.apply(bb.make().cuda(), method, **config)
    gpu.deltas.load_state_dict(cpu.deltas.state_dict())
    return bb, cpu, gpu


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("name", "method", "config"),
    [
        ("lstm", "lora", {"r": 4}),
        ("gru", "dora", {"r": 4}),
        ("mamba", "lora", {"r": 2, "targets": ["ssm.in", "ssm.dt", "ssm.out"]}),
        ("mamba", "ssf", {"targets": ["ssm.conv", "ssm.in"]}),
        ("mamba2", "ssf", {"targets": ["ssm.conv", "ssm.in"]}),
        ("resnet", "lora", {"r": 4}),
        ("convnext", "ssf", {}),
        ("gnn", "lora", {"r": 4}),
    ],
)
def test_training_step_on_cuda_matches_the_cpu(name: str, method: str, config: dict) -> None:
    """Output and every delta gradient of one training-mode step, CUDA against CPU; then
    the merged CUDA model equals the unmerged one."""
    bb, cpu, gpu = _pair(name, method, **config)
    x = bb.sample(0)
    cpu.train()
    gpu.train()
    want = bb.run(cpu, x)
    got = bb.run(gpu, _to(x, "cuda"))
    torch.testing.assert_close(got.detach().cpu(), want.detach(), atol=2e-4, rtol=2e-3)
    want.square().mean().backward()
    got.square().mean().backward()
    cpu_grads, gpu_grads = _grads(cpu), _grads(gpu)
    assert cpu_grads.keys() == gpu_grads.keys() and cpu_grads
    for key, grad in cpu_grads.items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(gpu_grads[key], grad, atol=2e-4 * scale, rtol=2e-3, msg=key)
    gpu.eval()
    with torch.no_grad():
        unmerged = bb.run(gpu, _to(x, "cuda"))
        gpu.merge()
        torch.testing.assert_close(bb.run(gpu, _to(x, "cuda")), unmerged, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["lstm", "gru", "mamba", "resnet", "convnext"])
def test_bf16_autocast_on_cuda_matches_bf16_autocast_on_the_cpu(name: str) -> None:
    """Under bf16 autocast the adapted model trains on CUDA (finite gradients, a ConvNet in
    channels-last memory) and its output is the CPU's under the same autocast, for the same
    weights: how far bf16 lands from float32 depends on the drawn weights (cancellation in a
    random tiny network), so the CPU run is the reference, not float32."""
    bb = BACKBONES[name]
    targets = ["ssm.in", "ssm.dt"] if name == "mamba" else None
    cpu = unipeft.apply(bb.make(), "lora", r=2, targets=targets)
    _randomise(cpu)
    model = unipeft.apply(bb.make().cuda(), "lora", r=2, targets=targets)
    model.deltas.load_state_dict(cpu.deltas.state_dict())
    model.train()  # cuDNN's recurrent backward runs in training mode only
    cpu.train()
    if name in ("resnet", "convnext"):
        model.base_model.to(memory_format=torch.channels_last)
    x = bb.sample(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = bb.run(model, _to(x, "cuda"))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = bb.run(cpu, x).float()
    scale = max(1.0, want.abs().max().item())
    assert (out.detach().float().cpu() - want).abs().max().item() <= 2e-2 * scale


def test_mamba_fused_kernel_detection_matches_what_the_mixer_runs() -> None:
    """Where ``mamba_ssm`` is importable, a training-mode mixer runs its fused kernel and the
    map hosts x_proj and out_proj; either way the adapted model trains on CUDA."""
    from unipeft.maps.ssm import MAMBA_MAP, fused_kernels

    bb = BACKBONES["mamba"]
    backbone = bb.make().cuda().train()
    hosted = {s.role for s in MAMBA_MAP.sites(backbone) if getattr(s, "host", None) is not None}
    if fused_kernels():
        assert {"ssm.x", "ssm.out"} <= hosted
    else:
        assert not {"ssm.x", "ssm.out"} & hosted
    model = unipeft.apply(backbone, "lora", r=2)
    _randomise(model)
    before = bb.run(model, _to(bb.sample(0), "cuda")).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = bb.run(model, _to(bb.sample(0), "cuda")).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(bb.run(model, _to(bb.sample(0), "cuda")).detach(), before)
