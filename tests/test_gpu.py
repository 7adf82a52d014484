"""The lifecycle on a CUDA device, compared with the same model on the CPU.

Run with ``pytest -m gpu`` on a machine with CUDA; the default run deselects these.
"""

from __future__ import annotations

import pytest
import torch
from _matrix import TRANSFORMERS, backbones, methods
from hypothesis import find, settings

import unipeft
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb
from unipeft.testing.strategies import configs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fitting(method: str, bb) -> dict:
    """The method's default config, or, where its sizes do not fit the tiny backbone (a block
    size wider than the layers), the simplest drawn config that does."""
    spec = unipeft.get_method(method)
    backbone = bb.make()
    try:
        unipeft.DeltaModel(backbone).plan(method)
    except unipeft.TargetError as exc:  # a vision- or CLIP-only method on another backbone
        if "match" in str(exc) and "nothing" in str(exc):
            pytest.skip(f"{method} does not attach to {bb.name} by default: {exc}")
        if bb.family not in TRANSFORMERS and "cannot attach" in str(exc):
            pytest.skip(f"{method} refuses {bb.name}'s sites by kind: {exc}")  # backbones.md
        raise
    except unipeft.ConfigError:
        pass

    def fits(cfg) -> bool:
        try:
            unipeft.DeltaModel(backbone).plan(method, **cfg.model_dump())
        except unipeft.ConfigError:
            return False
        return True

    found = find(configs(spec), fits, settings=settings(database=None, derandomize=True))
    return found.model_dump()


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full float32 in cuDNN's convolutions and recurrent kernels (TF32 by default), so that
    CUDA is compared with the CPU at float32 tolerance."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("name", backbones(family=None))
@pytest.mark.parametrize("method", methods())
def test_cuda_matches_cpu(name: str, method: str) -> None:
    bb = BACKBONES[name]
    fields = _fitting(method, bb)
    cpu = unipeft.apply(bb.make(), method, **fields)
    perturb(cpu)
    gpu = unipeft.apply(bb.make().cuda(), method, **fields)
    gpu.deltas.load_state_dict(cpu.deltas.state_dict())
    assert all(p.is_cuda for p in gpu.deltas.parameters())
    x = bb.sample(0)
    with torch.no_grad():
        want = bb.run(cpu, x)
        got = bb.run(gpu, _to(x, "cuda")).cpu()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("name", backbones())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_and_mixed_batch(name: str, dtype: torch.dtype) -> None:
    bb = BACKBONES[name]
    model = unipeft.apply(bb.make(dtype).cuda(), "lora", r=4, adapter_name="a")
    model.add_adapter("b", "lora", r=8)
    perturb(model)
    original = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    x = _to(bb.sample(0, dtype), "cuda")
    with torch.no_grad():
        per = {}
        for adapter in ("a", "b"):
            model.set_active(adapter)
            per[adapter] = bb.outputs(model, x)
        model.set_active(["a", "b"])
        unmerged = bb.run(model, x)
        for _ in range(3):
            model.merge()
            merged = bb.run(model, x)
            model.unmerge()
        model.set_active("a")
        with model.mixed_batch(["b", "a"]):
            mixed = bb.outputs(model, x)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(merged, unmerged, **tol)
    state = model.base_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items()), "unmerge is not exact"
    for k, tensor in enumerate(mixed):
        torch.testing.assert_close(tensor[0], per["b"][k][0], **tol)
        torch.testing.assert_close(tensor[1], per["a"][k][1], **tol)
