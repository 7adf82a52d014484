"""What the invariants and the lifecycle machine share: applying a method, reference outputs,
perturbing deltas and comparing tensors.

Reference outputs come from a frozen copy of the backbone: PyTorch picks different
``nn.MultiheadAttention`` kernels depending on ``requires_grad``, and unipeft freezes the
backbone, so only a frozen reference is comparable bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..contract.config import DeltaConfig
from ..contract.errors import ConfigError, UnipeftError
from ..contract.method import Method
from ..model import DeltaModel
from .backbones import TinyBackbone

ATOL = 1e-5
RTOL = 1e-4


class Refused(UnipeftError):
    """``unipeft.apply`` refused a valid config with a :class:`ConfigError` (a size above
    what the backbone's sites allow, say). The suite discards such a draw, as it does one
    that a ``TargetError`` refuses; every other exception at apply is a failure."""


def apply_method(
    method: Method, bb: TinyBackbone, cfg: DeltaConfig, model: nn.Module
) -> DeltaModel:
    import unipeft

    try:
        return unipeft.apply(model, method.id, **cfg.model_dump())
    except ConfigError as exc:
        raise Refused(f"apply refused {cfg!r}: {exc}") from exc


def add_same(model: DeltaModel, name: str, method: Method, cfg: DeltaConfig) -> None:
    """``add_adapter`` with the method's config; a refusal is :class:`Refused`."""
    try:
        model.add_adapter(name, method.id, **cfg.model_dump())
    except ConfigError as exc:
        raise Refused(f"add_adapter refused {cfg!r}: {exc}") from exc


def reference(bb: TinyBackbone, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    model = bb.make(dtype)
    model.requires_grad_(False)
    with torch.no_grad():
        return bb.run(model, bb.sample(seed, dtype))


def outputs(model: nn.Module, bb: TinyBackbone, seed: int = 0) -> Tensor:
    with torch.no_grad():
        return bb.run(model, bb.sample(seed))


def perturb(
    model: DeltaModel, seed: int = 1, scale: float = 0.1, adapter: str | None = None
) -> None:
    """Move delta parameters (of one adapter, or all) away from their init, so checks
    cannot pass vacuously."""
    gen = torch.Generator().manual_seed(seed)
    params = model.deltas[adapter].parameters() if adapter else model.deltas.parameters()
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_(noise.to(device=p.device, dtype=p.dtype) * scale)


def close(a: Tensor, b: Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def equal(a: Tensor, b: Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtypes differ, {a.dtype} vs {b.dtype}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.equal(a, b), f"{what}: not bit-identical (max abs diff {diff:.3e})"


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: state dict keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} changed"
