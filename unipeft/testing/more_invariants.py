"""Invariants 12 to 16: promises that hold beyond one process, one precision, eval mode and
a still model. :mod:`.invariants` adds them to ``INVARIANTS``; each catches a class of bug
that the first eleven let through (see the table in ``docs/conformance.md``).
"""

from __future__ import annotations

import tempfile
import types
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks.routing import same_choices
from ..contract.config import DeltaConfig
from ..contract.deltas import DeltaModule
from ..contract.method import Method
from ..model import DeltaModel
from ..runtime.norms import norms_with_statistics
from ._common import add_same, apply_method, close, equal, outputs, perturb, state
from .backbones import TinyBackbone
from .fresh import FreshInterpreterError, fresh_outputs

HALF_TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}
"""The largest difference allowed between a half-precision output and the float32 one,
relative to the float32 output's largest magnitude (at least 1). The tiny backbones alone
differ by about 1.2 % of it in bfloat16 and 0.12 % in float16."""

STEP_KINDS = ("optimizer", "no_grad")
"""The in-place changes ``mixed_batch_after_step`` makes, in this order."""

TRAIN_DROPOUT = 0.5
"""The rate ``train_mode`` gives every float field whose name contains ``dropout``."""


def fresh_interpreter_load(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """12. Adapters saved here and loaded in a fresh interpreter give bit-identical outputs.

    The other interpreter is the kit's worker (:mod:`unipeft.testing.fresh`): it never saw
    the model, and its global generator is freshly seeded before each load."""
    model = apply_method(method, bb, cfg, bb.make())
    perturb(model)
    model.eval()
    expected = [outputs(model, bb, seed) for seed in (0, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        try:
            got = fresh_outputs(method, bb, tmp, seeds=(0, 1))
        except FreshInterpreterError as exc:
            raise AssertionError(f"loading in a fresh interpreter failed: {exc}") from None
    for seed, (a, b) in enumerate(zip(got, expected)):
        equal(a, b, f"output (inputs of seed {seed}) loaded in a fresh interpreter vs here")


def _half_outputs(model: nn.Module, bb: TinyBackbone, dtype: torch.dtype) -> list[Tensor]:
    inputs = bb.sample(0, dtype)
    try:
        with torch.no_grad():
            outs = bb.outputs(model, inputs)
    except Exception as exc:  # a dtype mismatch inside the backbone, typically
        raise AssertionError(f"forward in {dtype} failed: {type(exc).__name__}: {exc}") from exc
    for i, t in enumerate(outs):
        assert t.dtype == dtype, f"output {i} is {t.dtype} on a {dtype} backbone"
        assert torch.isfinite(t).all(), f"output {i} is not finite in {dtype}"
    return outs


def half_precision(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """13. In bfloat16 and float16 (on the CPU) the adapted model runs, its outputs keep the
    backbone's dtype, and they are within :data:`HALF_TOLERANCE` of the float32 outputs of
    the same adapter. "The same adapter": the delta tensors rounded to the half dtype, run
    in float32, so that the check measures the half-precision computation, not the rounding
    of the parameters (which moves a discrete choice such as VB-LoRA's top-k on a tie).
    Routers of :mod:`unipeft.blocks.routing` that choose experts in the float32 run take the
    experts the half run chose (:func:`~unipeft.blocks.same_choices`): a near-tie broken the
    other way by rounding moves an output by a whole expert."""
    full = apply_method(method, bb, cfg, bb.make())
    perturb(full)
    weights = {k: v.clone() for k, v in full.deltas.state_dict().items()}
    for dtype, tol in HALF_TOLERANCE.items():
        rounded = {
            k: v.to(dtype).float() if v.is_floating_point() else v for k, v in weights.items()
        }
        full.deltas.load_state_dict(rounded)
        half = apply_method(method, bb, cfg, bb.make(dtype))
        half.deltas.load_state_dict(weights)
        for name, t in half.deltas.state_dict().items():
            if t.is_floating_point():
                assert t.dtype == dtype, f"{name} is {t.dtype} on a {dtype} backbone"
        # hard routers (top-k, top-p) in the float32 run take the half run's choices
        with same_choices(half.deltas, full.deltas):
            got = torch.cat([t.flatten() for t in _half_outputs(half, bb, dtype)])
            with torch.no_grad():
                expected = bb.run(full, bb.sample(0))
        scale = max(1.0, expected.abs().max().item())
        diff = (got.float() - expected).abs().max().item()
        assert diff <= tol * scale, (
            f"{dtype} output differs from float32 by {diff:.3e}, more than the tolerance "
            f"{tol} x {scale:.3g} (the float32 output's largest magnitude, at least 1)"
        )


def _with_dropout(method: Method, cfg: DeltaConfig) -> DeltaConfig:
    values = cfg.model_dump()
    for name in method.config.model_fields:
        if "dropout" in name and isinstance(values[name], float):
            values[name] = TRAIN_DROPOUT
    try:
        return method.config.model_validate(values)
    except Exception:  # a bound that refuses 0.5: keep the drawn rate
        return cfg


def _train_reference(bb: TinyBackbone) -> Tensor:
    model = bb.make().requires_grad_(False).train()
    for norm in norms_with_statistics(model):  # as DeltaModel.train() leaves them
        norm.eval()
    return bb.run(model, bb.sample(0)).detach()


def train_mode(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """14. In ``train()`` mode, with gradients on and every dropout field at 0.5: a method
    declaring identity at init leaves the output close to the base model's (also in train
    mode), and with perturbed deltas ``disable()`` gives the base output bit for bit."""
    cfg = _with_dropout(method, cfg)
    base = _train_reference(bb)
    model = apply_method(method, bb, cfg, bb.make())
    model.train()
    if method.is_identity_at_init(cfg):
        got = bb.run(model, bb.sample(0)).detach()
        close(got, base, "train-mode output at initialisation vs base (train mode)")
    perturb(model)
    bb.run(model, bb.sample(0))  # a training forward with the adapter on first
    with model.disable():
        off = bb.run(model, bb.sample(0)).detach()
    equal(off, base, "train-mode disabled output vs base (train mode)")


def _layout(module: nn.Module) -> tuple[Any, ...]:
    return (
        type(module),
        sorted(module.__dict__),
        sorted(module._parameters),
        sorted(module._buffers),
        sorted(module._modules),
    )


def _ours(value: object) -> str | None:
    """What of unipeft ``value`` is (a delta, a host, a bound method of one), or None."""
    if isinstance(value, types.MethodType):
        value = value.__self__
    if isinstance(value, DeltaModule | DeltaModel):
        return type(value).__name__
    module = getattr(type(value), "__module__", "") or ""
    if module == "unipeft" or module.startswith("unipeft."):
        if not module.startswith("unipeft.maps"):  # structure maps describe, never attach
            return f"{module}.{type(value).__qualname__}"
    return None


def _leaks(module: nn.Module) -> list[str]:
    found = []
    for key, value in module.__dict__.items():
        values = [value]
        if isinstance(value, dict):
            values += list(value.values())
        elif isinstance(value, list | tuple | set):
            values += list(value)
        for v in values:
            what = _ours(v)
            if what is not None:
                found.append(f"{key} -> {what}")
    return found


def unload_leaves_no_trace(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """15. After ``unload()`` every module of the backbone has exactly the attributes it had
    before ``apply()`` (its class, ``__dict__`` keys, parameters, buffers and submodules by
    name), and nothing of unipeft (a delta, a host, a bound method of one) is reachable from
    the modules' ``__dict__``."""
    base = bb.make()
    with torch.no_grad():  # a forward first: lazy attributes of the backbone itself appear
        bb.run(base, bb.sample(0))
    before = {name: _layout(m) for name, m in base.named_modules(remove_duplicate=False)}
    model = apply_method(method, bb, cfg, base)
    perturb(model)
    outputs(model, bb)
    if method.mergeable:
        model.merge()
        outputs(model, bb)
        model.unmerge()
    back = model.unload()
    after = {name: _layout(m) for name, m in back.named_modules(remove_duplicate=False)}
    assert after.keys() == before.keys(), (
        f"modules added or removed: {sorted(after.keys() ^ before.keys())[:5]}"
    )
    for name, layout in before.items():
        now = after[name]
        where = name or type(back).__name__
        assert now[0] is layout[0], f"{where}: class {layout[0].__name__} became {now[0].__name__}"
        for i, what in enumerate(("attributes", "parameters", "buffers", "submodules"), 1):
            extra, gone = set(now[i]) - set(layout[i]), set(layout[i]) - set(now[i])
            assert not extra and not gone, (
                f"{where}: {what} differ after unload: added {sorted(extra)}, "
                f"removed {sorted(gone)}"
            )
    for name, module in back.named_modules():
        leaks = _leaks(module)
        assert not leaks, f"{name or type(back).__name__} still reaches unipeft: {leaks[:3]}"


def _per_adapter(model: DeltaModel, bb: TinyBackbone, names: tuple[str, ...]) -> dict:
    inputs = bb.sample(0)
    got = {}
    with torch.no_grad():
        for name in names:
            model.set_active(name)
            got[name] = bb.outputs(model, inputs)
    model.set_active(names[0])
    return got


def _mixed(model: DeltaModel, bb: TinyBackbone, names: tuple[str, ...]) -> list[Tensor] | None:
    with torch.no_grad():
        try:
            with model.mixed_batch(names):
                return bb.outputs(model, bb.sample(0))
        except ValueError as exc:
            if "mixed batches with soft prompts" in str(exc):
                return None  # documented: no mask to hide other samples' prompts
            raise


def _step(model: DeltaModel, bb: TinyBackbone, how: str, seed: int) -> None:
    """Change every delta parameter in place, the way ``how`` says."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.deltas.parameters() if p.requires_grad]
    if how == "optimizer":
        # Adam: every parameter with a gradient moves by about lr, however small the
        # gradient (a one-vector VB-LoRA bank's is 1e-8: SGD would not change a bit)
        opt = torch.optim.Adam(params, lr=0.01)
        for name in model.adapters:
            model.set_active(name)
            out = bb.run(model, bb.sample(1))
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
        return
    noise = [torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05 for p in params]
    with torch.no_grad():
        for p, n in zip(params, noise):
            p.add_(n)


def mixed_batch_after_step(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """16. After the delta parameters change in place (an optimizer step; ``p.add_`` under
    ``no_grad``), a mixed batch still equals running each sample with its own adapter:
    nothing computed from the parameters before the change is reused. (Writes through
    ``p.data`` bypass PyTorch's version counters and are not covered: see
    docs/conformance.md.)"""
    model = apply_method(method, bb, cfg, bb.make())
    perturb(model, seed=1)
    add_same(model, "other", method, cfg)
    perturb(model, seed=2, adapter="other")
    names = ("other", "default")
    if _mixed(model, bb, names) is None:
        return
    for i, how in enumerate(STEP_KINDS):
        before = state(model.deltas)
        _step(model, bb, how, seed=10 + i)
        moved = [k for k, v in state(model.deltas).items() if not torch.equal(v, before[k])]
        assert moved, f"the {how} step changed no delta tensor"
        expected = _per_adapter(model, bb, ("default", "other"))
        got = _mixed(model, bb, names)
        assert got is not None
        for k, tensor in enumerate(got):
            for j, name in enumerate(names):
                close(
                    tensor[j],
                    expected[name][k][j],
                    f"mixed {names} after an in-place change ({how}): sample {j}",
                )


MORE_INVARIANTS = {
    "fresh_interpreter_load": fresh_interpreter_load,
    "half_precision": half_precision,
    "train_mode": train_mode,
    "unload_leaves_no_trace": unload_leaves_no_trace,
    "mixed_batch_after_step": mixed_batch_after_step,
}
"""Invariants 12 to 16, by name."""
