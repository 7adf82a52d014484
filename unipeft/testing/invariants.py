"""The conformance invariants every method signs, as plain functions.

Each takes a :class:`~unipeft.Method`, a :class:`TinyBackbone` and a config, and raises
``AssertionError`` with a message that says which promise broke. The pytest suite
(:mod:`unipeft.testing.suite`) runs them over every method × backbone with hypothesis.

Reference outputs come from a frozen copy of the backbone: PyTorch picks different
``nn.MultiheadAttention`` kernels depending on ``requires_grad``, and unipeft freezes the
backbone, so only a frozen reference is comparable bit for bit.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..contract.config import DeltaConfig
from ..contract.errors import ConfigError
from ..contract.method import Method
from ..features.saving import WEIGHTS_FILE
from ._common import ATOL, RTOL, Refused, outputs, perturb, reference
from ._common import add_same as _add_same
from ._common import apply_method as _apply
from ._common import close as _close
from ._common import equal as _equal
from ._common import same_state as _same_state
from ._common import state as _state
from .backbones import TinyBackbone
from .compose_invariant import COMPOSE_INVARIANTS
from .more_invariants import MORE_INVARIANTS
from .strategies import invalid_values

__all__ = ["ATOL", "INVARIANTS", "RTOL", "Refused", "outputs", "perturb", "reference"]


# ------------------------------------------------------------------------------ invariants


def trainable_count(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """1. Only delta parameters train, and their count is the method's formula."""
    model = _apply(method, bb, cfg, bb.make())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outside = sorted(n for n in trainable if not n.startswith("deltas."))
    assert not outside, f"backbone parameters left trainable: {outside[:5]}"
    frozen_delta = sorted(n for n, p in model.deltas.named_parameters() if not p.requires_grad)
    assert not frozen_delta, f"delta parameters not trainable: {frozen_delta[:5]}"
    adapter = model.adapters["default"]
    expected = sum(method.num_parameters(cfg, s) for s in adapter.sites)
    expected += method.count_shared(cfg, tuple(adapter.sites))
    got = model.num_trainable_parameters()
    assert got == expected, (
        f"{got} trainable parameters, but the formula ({method.formula}) gives {expected} "
        f"over {len(adapter.sites)} sites"
    )


def identity_at_init(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """2. A method declaring identity-at-init leaves the output unchanged."""
    if not method.is_identity_at_init(cfg):
        return
    model = _apply(method, bb, cfg, bb.make())
    _close(outputs(model, bb), reference(bb), "output at initialisation vs base")


def disabled_is_base(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """3. With adapters disabled the output is the base model's, bit for bit."""
    model = _apply(method, bb, cfg, bb.make())
    perturb(model)
    outputs(model, bb)  # run once with the adapter on: state left behind must not leak
    with model.disable():
        off = outputs(model, bb)
    _equal(off, reference(bb), "disabled output vs base")


def merge_roundtrip(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """4. Merged equals unmerged; unmerge restores the base weights exactly."""
    if not method.mergeable:
        return
    base = bb.make()
    model = _apply(method, bb, cfg, base)
    perturb(model)
    before = _state(base)
    unmerged = outputs(model, bb)
    model.merge()
    merged = outputs(model, bb)
    _close(merged, unmerged, "merged vs unmerged output")
    model.unmerge()
    _same_state(_state(base), before, "base weights after unmerge")
    _equal(outputs(model, bb), unmerged, "output after unmerge vs before merge")


def gradients_reach_all(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """5. One backward reaches every trainable parameter; a few steps change each.

    "Reaches" means the parameter is in the autograd graph of the loss (a gradient, maybe
    zero: LoRA's ``A`` gets exactly zero while ``B`` is zero). Every parameter that gets a
    non-zero gradient in 4 Adam steps must change. A unit that is dead on this batch (a ReLU
    never active) may keep a zero gradient; a delta whose parameters all stay at zero
    gradient fails.
    """
    model = _apply(method, bb, cfg, bb.make())
    model.eval()  # connectivity, not dropout: a dropout of 0.99 may zero a whole update
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    weights = None
    moved: set[str] = set()
    for step in range(4):
        out = bb.run(model, bb.sample(step))
        if weights is None:
            weights = torch.randn(out.shape, generator=gen)
        loss = (out * weights).sum()
        aux = model.aux_loss()
        if aux is not None:
            loss = loss + aux
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = sorted(n for n, p in params.items() if p.grad is None)
            assert not missing, f"backward does not reach: {missing[:5]}"
        bad = sorted(n for n, p in params.items() if not torch.isfinite(p.grad).all())
        assert not bad, f"non-finite gradients at step {step}: {bad[:5]}"
        moved.update(n for n, p in params.items() if bool(p.grad.abs().sum() > 0))
        opt.step()
    assert moved, "no delta parameter ever received a non-zero gradient"
    stuck = sorted(n for n in moved if torch.equal(params[n].detach(), start[n]))
    assert not stuck, f"non-zero gradients but no change after 4 steps: {stuck[:5]}"


def save_load_roundtrip(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """6. Save, load into a fresh backbone: identical outputs; the file holds deltas only."""
    import unipeft

    model = _apply(method, bb, cfg, bb.make())
    perturb(model)
    expected = outputs(model.eval(), bb)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        tensors = load_file(str(Path(tmp) / WEIGHTS_FILE))
        n_saved = sum(t.numel() for t in tensors.values())
        n_delta = sum(t.numel() for t in model.deltas.state_dict().values())
        assert n_saved == n_delta, f"file holds {n_saved} values, the deltas {n_delta}"
        backbone_names = set(dict(model.base_model.named_parameters()))
        leaked = [k for k in tensors if k.split("::")[-1] in backbone_names]
        assert not leaked, f"backbone tensors in the file: {leaked[:3]}"
        loaded = unipeft.load(bb.make(), tmp)
    _equal(outputs(loaded.eval(), bb), expected, "output after save/load")


def dtype_follows_backbone(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """9. Delta parameters take the backbone's dtype (float64 here) and device."""
    base = bb.make(torch.float64)
    model = _apply(method, bb, cfg, base)
    device = next(base.parameters()).device
    for name, p in model.deltas.named_parameters():
        assert p.dtype == torch.float64, f"{name} is {p.dtype}, backbone is float64"
        assert p.device == device, f"{name} is on {p.device}, backbone on {device}"
    perturb(model)
    with torch.no_grad():
        out = bb.run(model, bb.sample(0, torch.float64))
    assert out.dtype == torch.float64, f"output dtype {out.dtype}"
    assert torch.isfinite(out).all(), "non-finite output in float64"


def config_json_roundtrip(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """10. Configs round-trip through JSON; invalid values fail naming the field."""
    again = method.config.model_validate_json(cfg.model_dump_json())
    assert again == cfg, f"JSON round trip changed the config: {cfg} -> {again}"
    json.loads(cfg.model_dump_json())
    base = cfg.model_dump()
    for field, value in invalid_values(method):
        try:
            method.config.parse(method.id, {**base, field: value})
        except ConfigError as exc:
            assert repr(field) in str(exc), f"error for {field}={value!r} does not name it: {exc}"
        else:
            raise AssertionError(f"{field}={value!r} is outside its declared range but accepted")
    try:
        method.config.parse(method.id, {**base, "no_such_field": 1})
    except ConfigError as exc:
        assert "no_such_field" in str(exc), str(exc)
    else:
        raise AssertionError("an unknown field was accepted")


def unload_restores(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """11. unload() gives back the backbone with its state dict, flags and no hooks."""
    base = bb.make()
    before = _state(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = _apply(method, bb, cfg, base)
    perturb(model)
    if method.mergeable:
        model.merge()
    back = model.unload()
    assert back is base, "unload() did not return the backbone object"
    _same_state(_state(back), before, "state dict after unload")
    assert flags == {n: p.requires_grad for n, p in back.named_parameters()}, "requires_grad"
    for name, module in back.named_modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks)
        assert not any(hooks), f"hooks left on {name or type(back).__name__}"
        assert "forward" not in module.__dict__, f"forward left overridden on {name}"
    back.requires_grad_(False)
    _equal(outputs(back, bb), reference(bb), "output after unload")


def adapters_isolated(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """7. Adding, training and deleting adapter B leaves outputs with A active unchanged."""
    model = _apply(method, bb, cfg, bb.make())
    perturb(model, seed=1)
    expected = outputs(model, bb)
    before_a = {k: v.clone() for k, v in model.deltas["default"].state_dict().items()}
    _add_same(model, "other", method, cfg)
    _equal(outputs(model, bb), expected, "output with A active after adding B")
    perturb(model, seed=2, adapter="other")
    model.set_active("other")
    opt = torch.optim.Adam(model.deltas["other"].parameters(), lr=1e-2)
    for step in range(2):
        loss = bb.run(model, bb.sample(step)).square().mean()
        aux = model.aux_loss()
        opt.zero_grad()
        (loss if aux is None else loss + aux).backward()
        opt.step()
    model.set_active("default")
    _equal(outputs(model, bb), expected, "output with A active after training B")
    for k, v in model.deltas["default"].state_dict().items():
        assert torch.equal(v, before_a[k]), f"training B changed A's {k}"
    model.delete_adapter("other")
    assert not any(k.startswith("deltas.other.") for k in model.state_dict()), "B left state"
    _equal(outputs(model, bb), expected, "output with A active after deleting B")


def mixed_batch_matches(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """8. A mixed batch equals running each sample with its own adapter.

    Prompt methods on backbones without an attention mask (vision towers) must refuse
    mixed batches with a clear error instead.
    """
    model = _apply(method, bb, cfg, bb.make())
    perturb(model, seed=1)
    _add_same(model, "other", method, cfg)
    perturb(model, seed=2, adapter="other")
    inputs = bb.sample(0)
    with torch.no_grad():
        per_adapter = {}
        for name in ("default", "other"):
            model.set_active(name)
            per_adapter[name] = bb.outputs(model, inputs)
        with model.disable():
            per_adapter["__base__"] = bb.outputs(model, inputs)
        model.set_active("default")
        for names in (("other", "default"), ("__base__", "other")):
            try:
                with model.mixed_batch(names):
                    got = bb.outputs(model, inputs)
            except ValueError as exc:
                if "mixed batches with soft prompts" in str(exc):
                    return  # documented: no mask to hide other samples' prompts
                raise
            for k, tensor in enumerate(got):
                for i, name in enumerate(names):
                    _close(tensor[i], per_adapter[name][k][i], f"mixed {names}: sample {i}")


INVARIANTS = {
    "trainable_count": trainable_count,
    "identity_at_init": identity_at_init,
    "disabled_is_base": disabled_is_base,
    "merge_roundtrip": merge_roundtrip,
    "gradients_reach_all": gradients_reach_all,
    "save_load_roundtrip": save_load_roundtrip,
    "dtype_follows_backbone": dtype_follows_backbone,
    "config_json_roundtrip": config_json_roundtrip,
    "unload_restores": unload_restores,
    "adapters_isolated": adapters_isolated,
    "mixed_batch_matches": mixed_batch_matches,
    **MORE_INVARIANTS,
    **COMPOSE_INVARIANTS,
}
"""Every invariant, by name."""
