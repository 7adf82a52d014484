"""Invariant 17: every method works with several adapters under every composition operator
(:mod:`unipeft.compose`), or refuses the operator by name. :mod:`.invariants` adds it to
``INVARIANTS``; ``docs/composition.md`` states the formulas it checks.
"""

from __future__ import annotations

import tempfile

import torch
from torch import Tensor

from ..compose import Average, Fuse, Parallel, Stack
from ..contract.config import DeltaConfig
from ..contract.errors import AdapterError
from ..contract.method import Method
from ..model import DeltaModel
from ..runtime.compose import positional
from ._common import add_same, apply_method, close, equal, outputs, perturb
from .backbones import TinyBackbone

PROMPT_MIX = "mixed batches with soft prompts"
"""The start of the refusal a mixed batch (and so Parallel) gets from a prompt method on a
backbone without an attention mask."""

TOO_LONG = "position table holds"
"""In the refusal of more soft tokens than a position table holds (two adapters' prompts
together may be too many where each alone fits)."""


def _outputs(model: DeltaModel, bb: TinyBackbone) -> list[Tensor]:
    with torch.no_grad():
        return bb.outputs(model, bb.sample(0))


def _refuses(model: DeltaModel, comp: Average | Fuse, method: Method) -> None:
    op = type(comp).__name__
    try:
        model.set_active(comp)
    except AdapterError as exc:
        text = str(exc)
        assert op in text and method.id in text, (
            f"set_active({comp!r}) was refused, but the message names not both the operator "
            f"{op!r} and the method {method.id!r}: {text}"
        )
        return
    raise AssertionError(f"set_active({comp!r}) was accepted, but {method.id} cannot take it")


def _parallel(model: DeltaModel, bb: TinyBackbone, expected: list[list[Tensor]]) -> None:
    model.set_active(Parallel("default", "other"))
    try:
        got = _outputs(model, bb)
    except ValueError as exc:
        if PROMPT_MIX in str(exc):
            return  # documented: no mask hides one copy's prompts from the other's
        raise
    for k, tensor in enumerate(got):
        want = torch.cat([expected[0][k], expected[1][k]], dim=0)
        close(
            tensor,
            want,
            f"Parallel('default', 'other'), output {k} vs each adapter's, concatenated",
        )


def composition(method: Method, bb: TinyBackbone, cfg: DeltaConfig) -> None:
    """17. Three perturbed adapters (``default``, ``other``, and ``copy``, which holds
    ``default``'s tensors): ``Stack`` is ``set_active([...])`` bit for bit; ``Parallel``
    gives each adapter's outputs concatenated along the batch; ``Average(default, copy)``
    and ``Average(default, other, weights=[1, 0])`` give ``default``'s output;
    ``Fuse(default, copy)`` gives it too (the value matrix is the identity, the attention
    weights sum to 1); ``Fuse(default, other)``'s layers are trainable, get gradients, and
    are saved and loaded with the composition, bit for bit. Methods with soft tokens or
    prefixes must refuse ``Average`` and ``Fuse``, and methods at a site whose width is
    unknown before it runs (a whole tower) ``Fuse``, with a message naming the operator
    and the method."""
    model = apply_method(method, bb, cfg, bb.make())
    perturb(model, seed=1)
    add_same(model, "other", method, cfg)
    perturb(model, seed=2, adapter="other")
    model.eval()
    with torch.no_grad():
        model.set_active(["default", "other"])
        try:
            listed = outputs(model, bb)
        except ValueError as exc:
            if TOO_LONG not in str(exc):
                raise
            listed = None  # both prompts together do not fit: nothing to compare
        if listed is not None:
            model.set_active(Stack("default", "other"))
            equal(outputs(model, bb), listed, "Stack('default', 'other') vs set_active([...])")
        alone = []
        for name in ("default", "other"):
            model.set_active(name)
            alone.append(_outputs(model, bb))
    if positional(model.adapters["default"]) is not None:
        _refuses(model, Average("default", "other"), method)
        _refuses(model, Fuse("default", "other"), method)
        _parallel(model, bb, alone)
        return
    _parallel(model, bb, alone)
    add_same(model, "copy", method, cfg)
    model.deltas["copy"].load_state_dict(model.deltas["default"].state_dict())
    base = torch.cat([t.flatten() for t in alone[0]])
    blind = any(s.features <= 0 for s in model.adapters["default"].sites)
    fuses = () if blind else (Fuse("default", "copy"),)
    with torch.no_grad():
        for comp in (
            Average("default", "copy"),
            Average("default", "other", weights=[1.0, 0.0]),
            *fuses,
        ):
            model.set_active(comp)
            if isinstance(comp, Fuse):  # move Q and K: the attention is not uniform
                gen = torch.Generator().manual_seed(3)
                for layer in model.fusions[comp.name].values():
                    for p in (layer.query.weight, layer.key.weight):
                        p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.5)
            close(outputs(model, bb), base, f"{comp!r} vs 'default' alone")
    if blind:  # a site whose width is unknown before it runs: no fusion layer fits it
        _refuses(model, Fuse("default", "other"), method)
        return
    _fuse_trains_and_saves(model, bb)


def _fuse_trains_and_saves(model: DeltaModel, bb: TinyBackbone) -> None:
    fuse = Fuse("default", "other")
    model.set_active(fuse)
    layers = model.fusions[fuse.name]
    params = dict(layers.named_parameters())
    assert params, "Fuse('default', 'other') created no fusion layer"
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in params.values()), "fusion layers not in model.parameters()"
    assert all(p.requires_grad for p in params.values()), "fusion parameters are frozen"
    for name in fuse.leaves():
        live = [n for n, p in model.deltas[name].named_parameters() if p.requires_grad]
        assert not live, f"the fused adapter {name!r} still trains {live[:3]}"
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
    model.train()
    try:
        loss = bb.run(model, bb.sample(0)).float().pow(2).mean()
        aux = model.aux_loss()
        assert aux is not None and torch.isfinite(aux), f"aux_loss with a Fuse active: {aux}"
        (loss + aux).backward()
    finally:
        model.eval()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"fusion parameters got no gradient: {missing[:3]}"
    total = sum(float(p.grad.abs().sum()) for p in params.values())  # type: ignore[union-attr]
    assert total > 0 and torch.isfinite(torch.tensor(total)), f"fusion gradients sum to {total}"
    expected = outputs(model, bb)
    import unipeft

    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        loaded = unipeft.load(bb.make(), tmp)
    assert loaded.active_composition == fuse, (
        f"loaded composition {loaded.active_composition!r}, saved {fuse!r}"
    )
    equal(outputs(loaded, bb), expected, "Fuse('default', 'other') saved and loaded")


COMPOSE_INVARIANTS = {"composition": composition}
