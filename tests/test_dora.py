"""DoRA: the factored norm, forward, gradients, merging, saving, and agreement with PEFT."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
from _matrix import backbones, sites
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import unipeft
from unipeft.contract.sites import Layout
from unipeft.features.arithmetic import combine
from unipeft.methods.reparameterized.dora import DoraDelta
from unipeft.model import DeltaModel, site_key
from unipeft.testing.backbones import BACKBONES

# every backbone, so every projection layout: Linear (BERT, Llama without bias), GPT-2
# Conv1D slices, timm's fused qkv slices, nn.MultiheadAttention in_proj slices (open_clip),
# and the patch convolutions of the vision towers
ALL = backbones()


def _targets(name: str) -> list[str]:
    """DoRA's defaults (attn.q, attn.v), and the patch embedding where it is a projection
    (the convolution of a vision tower; a text embedding is a lookup table)."""
    embeds = [
        f"{s.tower}/embed" if s.tower else "embed"
        for s in sites(name)
        if s.role == "embed" and s.is_projection
    ]
    return ["attn.q", "attn.v", *embeds]


def _layouts(name: str) -> set[str]:
    """The weight layouts of the sites :func:`_targets` names, as the structure map says."""
    wanted = {t.rpartition("/")[2] for t in _targets(name)}
    return {s.weight.layout for s in sites(name) if s.role in wanted and s.is_projection}


def _apply(name: str, dtype: torch.dtype = torch.float32, **kw) -> DeltaModel:
    backbone = BACKBONES[name].make(dtype)
    kw.setdefault("targets", _targets(name))
    model = unipeft.apply(backbone, "dora", **{"r": 3, "alpha": 5.0, **kw})
    _randomise(model)
    return model


def _randomise(model: DeltaModel, seed: int = 0, adapter: str | None = None) -> None:
    """A, B and the magnitude far from their init (s·BA comparable to W)."""
    gen = torch.Generator().manual_seed(seed)
    names = [adapter] if adapter else list(model.deltas)
    with torch.no_grad():
        for name in names:
            for delta in model.deltas[name].values():
                for pname, p in delta.named_parameters():
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    if pname == "magnitude":
                        new = p.double() * (1.0 + 0.3 * noise)
                    else:
                        new = 0.2 * noise
                    p.copy_(new.to(p.dtype))


def _deltas(model: DeltaModel, adapter: str = "default") -> list[tuple[object, DoraDelta]]:
    out = []
    for site in model.adapters[adapter].sites:
        delta = model.deltas[adapter][site_key(site)]
        assert isinstance(delta, DoraDelta)
        out.append((site, delta))
    return out


def _adapted_rows(delta: DoraDelta, weight: Tensor) -> Tensor:
    """``W + s·B A`` as ``(out, in·k)``, materialised in float64."""
    w = weight.double().reshape(weight.shape[0], -1)
    ba = delta.B.detach().double() @ delta.A.detach().double().reshape(delta.r, -1)
    return w + delta.scaling * ba


def _reference_weight(delta: DoraDelta, weight: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖`` materialised in float64, in ``weight``'s shape.
    ``magnitude``: a (possibly grad-tracking) float64 magnitude; the norm is detached."""
    v = _adapted_rows(delta, weight)
    m = delta.magnitude.detach().double() if magnitude is None else magnitude
    return (m / v.norm(dim=1).detach())[:, None].mul(v).reshape(weight.shape)


def _site_input(delta: DoraDelta, dtype: torch.dtype, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if delta.shape.is_conv:  # 16 along each of the kernel's (spatial, temporal) dimensions
        size = (2, delta.shape.in_features, *(16 for _ in delta.shape.kernel_size))
        return torch.randn(size, generator=gen).to(dtype)
    return torch.randn(2, 5, delta.shape.in_features, generator=gen).to(dtype)


# ------------------------------------------------------------------------------ the norm


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_norm_equals_the_materialised_norm(name: str, dtype: torch.dtype) -> None:
    model = _apply(name, dtype)
    layouts = set()
    for site, delta in _deltas(model):
        layouts.add(site.weight.layout)
        weight, _ = site.weight_views()
        got = delta.weight_norm(weight)
        assert got.dtype == torch.float32  # float32 for both: bf16 weights are upcast
        assert not got.requires_grad
        expected = _adapted_rows(delta, weight).norm(dim=1)
        # from the same (bf16-rounded) W, A and B: only float32 rounding differs
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)
    assert layouts == _layouts(name)  # every layout targeted was checked


def test_the_backbones_cover_every_projection_layout() -> None:
    """Together the backbones give the tests above every layout a projection can have."""
    covered = set().union(*(_layouts(name) for name in ALL))
    assert covered == set(typing.get_args(Layout))


def test_norm_is_float64_for_a_float64_weight() -> None:
    model = _apply("bert", torch.float64)
    site, delta = _deltas(model)[0]
    weight, _ = site.weight_views()
    got = delta.weight_norm(weight)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _adapted_rows(delta, weight).norm(dim=1), rtol=1e-12, atol=0)


class _Shapes(TorchDispatchMode):
    """Records the shape of every new tensor an aten op allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [
            t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        ]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # views and in-place results share an input's storage: nothing was built
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("name", ALL)
def test_forward_never_builds_a_weight_sized_tensor(name: str) -> None:
    model = _apply(name)
    for site, delta in _deltas(model):
        weight, bias = site.weight_views()
        x = _site_input(delta, torch.float32)
        y = delta.shape.project(x, weight, bias)
        out, fan_in = weight.shape[0], weight[0].numel()
        forbidden = {tuple(weight.shape), (out, fan_in), (fan_in, out)}
        with _Shapes() as rec:
            delta(x, y).sum().backward()
        built = sorted(set(rec.shapes) & forbidden)
        assert not built, f"{site.name}: a tensor of the weight's size was built: {built}"


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", ALL)
def test_forward_equals_the_materialised_weight(name: str) -> None:
    model = _apply(name)
    for site, delta in _deltas(model):
        weight, bias = site.weight_views()
        x = _site_input(delta, torch.float32)
        y = delta.shape.project(x, weight, bias)
        w_new = _reference_weight(delta, weight).float()
        expected = delta.shape.project(x, w_new, bias)
        with torch.no_grad():
            got = delta(x, y)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=site.name)


def test_identity_at_init_is_exact() -> None:
    for name in ALL:
        bb = BACKBONES[name]
        backbone = bb.make()
        model = unipeft.apply(backbone, "dora", r=4, targets=_targets(name))
        for site, delta in _deltas(model):
            weight, bias = site.weight_views()
            torch.testing.assert_close(
                delta.magnitude.double(), weight.double().reshape(weight.shape[0], -1).norm(dim=1)
            )
            x = _site_input(delta, torch.float32)
            y = delta.shape.project(x, weight, bias)
            with torch.no_grad():
                assert torch.equal(delta(x, y), y), f"{name} {site.name}: not the identity"


# ------------------------------------------------------------------------------ gradients


def _reference_loss(
    delta: DoraDelta,
    weight: Tensor,
    bias: Tensor | None,
    x: Tensor,
    r: Tensor,
    a: Tensor,
    b: Tensor,
    m: Tensor,
    *,
    detach: bool,
) -> Tensor:
    """``Σ r ⊙ project(x, W')`` with ``W'`` materialised from leaves ``a``, ``b``, ``m``."""
    w = weight.reshape(weight.shape[0], -1)
    v = w + delta.scaling * (b @ a.reshape(delta.r, -1))
    n = v.norm(dim=1)
    w_new = ((m / (n.detach() if detach else n))[:, None] * v).reshape(weight.shape)
    return (delta.shape.project(x, w_new, bias) * r).sum()


@pytest.mark.parametrize("name", ALL)
def test_gradients_treat_the_norm_as_a_constant(name: str) -> None:
    model = _apply(name, torch.float64)
    for site, delta in _deltas(model):
        weight, bias = site.weight_views()
        x = _site_input(delta, torch.float64)
        y = delta.shape.project(x, weight, bias)
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        delta.zero_grad()
        (delta(x, y) * r).sum().backward()

        # the reference: W' materialised from leaf copies, its norm detached
        a = delta.A.detach().clone().requires_grad_(True)
        b = delta.B.detach().clone().requires_grad_(True)
        m = delta.magnitude.detach().clone().requires_grad_(True)

        ref = (delta, weight, bias, x, r, a, b, m)
        grads = torch.autograd.grad(_reference_loss(*ref, detach=True), (a, b, m))
        for got, want, what in zip(
            (delta.A.grad, delta.B.grad, delta.magnitude.grad), grads, "ABm"
        ):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{site.name} {what}")
        # and the detachment matters: through the norm the gradients would differ
        full = torch.autograd.grad(_reference_loss(*ref, detach=False), (a, b, m))
        assert not torch.allclose(full[1], grads[1], rtol=1e-6, atol=1e-9)


def test_dropout_only_on_the_low_rank_path() -> None:
    model = _apply("bert", dropout=0.5)
    site, delta = _deltas(model)[0]
    weight, bias = site.weight_views()
    x = _site_input(delta, torch.float32)
    y = delta.shape.project(x, weight, bias)
    delta.train()
    torch.manual_seed(0)
    got = delta(x, y)
    torch.manual_seed(0)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    with torch.no_grad():
        g = delta.magnitude.double() / _adapted_rows(delta, weight).norm(dim=1)
        low = delta.scaling * torch.nn.functional.linear(
            torch.nn.functional.linear(xd.double(), delta.A.double()), delta.B.double()
        )
        expected = g * (y.double() - bias.double() + low) + bias.double()
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("name", ALL)
def test_merge_is_the_reference_weight_and_unmerge_is_exact(name: str) -> None:
    bb = BACKBONES[name]
    model = _apply(name)
    base = model.base_model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = {
        site.name: _reference_weight(delta, site.weight_views()[0])
        for site, delta in _deltas(model)
    }
    with torch.no_grad():
        unmerged = bb.run(model, bb.sample(0))
        model.merge()
        for site, _ in _deltas(model):
            torch.testing.assert_close(
                site.weight_views()[0].double(), expected[site.name], atol=1e-6, rtol=1e-5
            )
        merged = bb.run(model, bb.sample(0))
        model.unmerge()
        again = bb.run(model, bb.sample(0))
    torch.testing.assert_close(merged, unmerged, atol=2e-5, rtol=1e-4)
    assert torch.equal(again, unmerged)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_delta_weight_is_the_additive_change() -> None:
    model = _apply("timm_vit")
    for site, delta in _deltas(model):
        weight, _ = site.weight_views()
        want = _reference_weight(delta, weight) - weight.double()
        got = delta.delta_weight()
        assert got.shape == weight.shape and got.dtype == delta.A.dtype
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_norm_follows_another_adapter_merged_into_the_same_weight() -> None:
    """The norm is read from the weight as stored. The merge ledger writes through
    ``.data``, which leaves the parameter's version counter unchanged, so a cache keyed on it
    would go stale here; DoRA reads ``‖W‖`` live instead."""
    bb = BACKBONES["bert"]
    model = _apply("bert", targets=["attn.q"])
    torch.manual_seed(0)  # LoRA's A: the same draw whichever tests ran before
    model.add_adapter("lora", "lora", r=2, targets=["attn.q"])
    with torch.no_grad():
        for delta in model.deltas["lora"].values():
            delta.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    model.set_active(["lora", "default"])
    site, delta = _deltas(model)[0]
    pristine = site.weight_views()[0].clone()
    with torch.no_grad():
        before = delta.weight_norm(site.weight_views()[0])
        model.merge("lora")
        live = site.weight_views()[0]
        assert not torch.equal(live, pristine)
        after = delta.weight_norm(live)
        torch.testing.assert_close(after.double(), _adapted_rows(delta, live).norm(dim=1))
        assert not torch.allclose(after, before)
        # DoRA running on the weight with LoRA inside == both merged, in that order
        partial = bb.run(model, bb.sample(0))
        model.merge("default")
        both = bb.run(model, bb.sample(0))
        model.unmerge()
    torch.testing.assert_close(both, partial, atol=2e-5, rtol=1e-4)
    assert torch.equal(site.weight_views()[0], pristine)
    torch.testing.assert_close(delta.weight_norm(site.weight_views()[0]), before, atol=0, rtol=0)


# ------------------------------------------------------------------------------ state, io


def test_state_dict_holds_a_b_and_magnitude_only(tmp_path: Path) -> None:
    bb = BACKBONES["gpt2"]
    model = _apply("gpt2")
    for _, delta in _deltas(model):
        assert sorted(delta.state_dict()) == ["A", "B", "magnitude"]
        assert not list(delta.buffers())
    with torch.no_grad():
        expected = bb.run(model.eval(), bb.sample(0))
    model.save(tmp_path)
    meta = json.loads((tmp_path / "unipeft_adapters.json").read_text())
    assert json.dumps(meta).count('"dora"') >= 1
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "unipeft_adapters.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"A", "B", "magnitude"}
    assert all("::dora." in k for k in keys)
    loaded = unipeft.load(bb.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(bb.run(loaded.eval(), bb.sample(0)), expected)


# ------------------------------------------------------------------------------ mixed batches


def test_mixed_batch_with_different_ranks_and_the_base() -> None:
    bb = BACKBONES["llama"]
    model = _apply("llama", r=2)
    model.add_adapter("big", "dora", r=5, alpha=3.0, use_rslora=True)
    _randomise(model, seed=3, adapter="big")
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, 100, (3, 7), generator=gen),
        "attention_mask": torch.ones(3, 7, dtype=torch.long),
    }
    names = ["big", "__base__", "default"]
    with torch.no_grad():
        alone = {}
        for name in ("default", "big"):
            model.set_active(name)
            alone[name] = bb.outputs(model, inputs)[0]
        with model.disable():
            alone["__base__"] = bb.outputs(model, inputs)[0]
        with model.mixed_batch(names):
            mixed = bb.outputs(model, inputs)[0]
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ arithmetic


def test_svd_combination_reproduces_the_adapter_at_full_rank() -> None:
    bb = BACKBONES["bert"]
    model = _apply("bert")
    combine(model, {"default": 1.0}, "copy", how="svd", rank=32)
    assert model.adapters["copy"].method.id == "lora"
    with torch.no_grad():
        want = bb.run(model, bb.sample(0))
        model.set_active("copy")
        got = bb.run(model, bb.sample(0))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_linear_combination_averages_the_parameters() -> None:
    model = _apply("bert")
    model.add_adapter("other", "dora", r=3, alpha=5.0)
    _randomise(model, seed=7, adapter="other")
    combine(model, {"default": 0.25, "other": 0.75}, "avg", how="linear")
    for key, delta in model.deltas["avg"].items():
        for name, p in delta.named_parameters():
            a = dict(model.deltas["default"][key].named_parameters())[name]
            b = dict(model.deltas["other"][key].named_parameters())[name]
            torch.testing.assert_close(p, 0.25 * a + 0.75 * b)


# ------------------------------------------------------------------------------ HF PEFT


def _whole_linear_qv(name: str) -> list[str]:
    """The module paths of attn.q and attn.v where both are whole ``nn.Linear`` modules,
    else none: PEFT adapts modules by name, so it cannot adapt a slice of a fused
    projection, and its DoRA has no ``Conv1D`` or ``nn.MultiheadAttention`` layer."""
    qv = [s for s in sites(name) if s.role in ("attn.q", "attn.v")]
    if any(s.out_slice is not None or s.weight.layout != "linear" for s in qv):
        return []
    return [s.path for s in qv]


@pytest.mark.parametrize("name", backbones(where=lambda bb: bool(_whole_linear_qv(bb.name))))
def test_matches_peft_dora(name: str) -> None:
    peft = pytest.importorskip("peft")
    bb = BACKBONES[name]
    modules = _whole_linear_qv(name)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules, use_dora=True
    )
    theirs = peft.get_peft_model(bb.make(), config).base_model.model.eval()
    ours = unipeft.apply(bb.make(), "dora", r=4, alpha=8.0).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for site, delta in _deltas(ours):
        layer = theirs.get_submodule(site.path)
        mag = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(delta.magnitude, mag)  # the same init: ‖W‖
        with torch.no_grad():
            layer.lora_A["default"].weight.normal_(0, 0.2, generator=gen)
            layer.lora_B["default"].weight.normal_(0, 0.2, generator=gen)
            mag.mul_(1 + 0.3 * torch.randn(mag.shape, generator=gen))
            delta.A.copy_(layer.lora_A["default"].weight)
            delta.B.copy_(layer.lora_B["default"].weight)
            delta.magnitude.copy_(mag)
        pairs.append((delta, layer))
    inputs = bb.sample(0)
    out_theirs = bb.run(theirs, inputs)
    out_ours = bb.run(ours, inputs)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    weights = torch.randn(out_ours.shape, generator=gen)
    (out_theirs * weights).sum().backward()
    (out_ours * weights).sum().backward()
    for delta, layer in pairs:
        for mine, their in (
            (delta.A, layer.lora_A["default"].weight),
            (delta.B, layer.lora_B["default"].weight),
            (delta.magnitude, layer.lora_magnitude_vector["default"].weight),
        ):
            torch.testing.assert_close(mine.grad, their.grad, atol=1e-5, rtol=1e-3)
    # merged weights agree too
    with torch.no_grad():
        ours.merge()
        for delta, layer in pairs:
            layer.merge()
            torch.testing.assert_close(
                delta.base()[0], layer.get_base_layer().weight, atol=1e-6, rtol=1e-5
            )


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_bf16_norm_and_forward_match_cpu(name: str) -> None:
    bb = BACKBONES[name]
    cpu = _apply(name)
    kw = {"r": 3, "alpha": 5.0, "targets": _targets(name)}
    for dtype in (torch.float32, torch.bfloat16):
        gpu = unipeft.apply(bb.make().to("cuda", dtype), "dora", **kw)
        gpu.deltas.load_state_dict(cpu.deltas.state_dict())
        for site, delta in _deltas(gpu):
            weight, _ = site.weight_views()
            got = delta.weight_norm(weight)  # bf16: W Aᵀ accumulated in float32 by the GEMM
            assert got.dtype == torch.float32 and got.is_cuda
            want = _adapted_rows(delta, weight).norm(dim=1)
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
        x = {k: v.to("cuda") for k, v in bb.sample(0, dtype).items()}
        with torch.no_grad():
            want = bb.run(cpu, bb.sample(0))
            got = bb.run(gpu, x)
        tol = (
            {"atol": 2e-4, "rtol": 2e-3} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
        )
        torch.testing.assert_close(got.float().cpu(), want, **tol)
        with torch.no_grad():
            unmerged = bb.run(gpu, x)
            gpu.merge()
            merged = bb.run(gpu, x)
            gpu.unmerge()
        mtol = (
            {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
        )
        torch.testing.assert_close(merged.float(), unmerged.float(), **mtol)


def test_frozen_weight_norm_is_cached_until_the_weight_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """‖W‖² of the frozen weight is computed once, and again only after the weight changes
    in place (here: by hand under no_grad, and by merging another adapter into it)."""
    from unipeft.methods import dora as dora_mod
    from unipeft.testing.backbones import BACKBONES
    from unipeft.testing.invariants import perturb

    calls: list[int] = []
    real = dora_mod._row_squares

    def counting(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(w)

    monkeypatch.setattr(dora_mod, "_row_squares", counting)
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "dora", r=2, targets=["attn.q"], adapter_name="d")
    model.add_adapter("l", "lora", r=2, targets=["attn.q"])
    perturb(model, seed=3)
    perturb(model, seed=4, adapter="l")
    sites = 2  # attn.q in each of the two layers
    inputs = bb.sample()
    calls.clear()  # building the adapter computed the initial magnitudes
    with torch.no_grad():
        first = bb.run(model, inputs)
        assert len(calls) == sites
        assert torch.equal(bb.run(model, inputs), first)
        assert len(calls) == sites  # served from the cache
        q = model.base_model.layers[0].self_attn.q_proj
        q.weight.mul_(1.5)  # an in-place update moves the version counter
        changed = bb.run(model, inputs)
        assert len(calls) == sites + 1 and not torch.equal(changed, first)
        q.weight.div_(1.5)
        calls.clear()
        model.set_active(["d", "l"])
        model.merge("l")  # written through .data; the ledger bumps the version
        merged = bb.run(model, inputs)
        assert len(calls) == sites
        model.unmerge("l")
        unmerged = bb.run(model, inputs)
        assert len(calls) == 2 * sites
    # with "l" merged, DoRA's norm covers W + ΔW_l, so the two forwards differ
    assert not torch.allclose(merged, unmerged)
