"""The fast paths compute exactly what the plain path computes.

- ``add_low_rank``: ``y + s · h B^T`` as one ``addmm`` (in place without gradients);
- ``SharedDown``: one ``x @ [A_q; A_k; A_v]^T`` for projections that read the same input;
- fused projections (timm ``qkv``, GPT-2 ``c_attn``, MHA ``in_proj``) updated slice by slice
  inside the module's output, without a concatenation;
- mixed batches accumulated in place.

Each is compared with the plain formula, or with the same model whose sharing is switched
off, on outputs and on every gradient.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from _matrix import backbones, has_fused_qkv, methods
from _matrix import projection_roles as all_linear

import unipeft
from unipeft.blocks.fused import lora_linear
from unipeft.methods.reparameterized.lora import LoraDelta, SharedDown, add_low_rank
from unipeft.methods.reparameterized.lora import fast as lora_mod
from unipeft.methods.reparameterized.lora import mixed as mixed_mod
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb


def _plain(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return y + F.linear(h, b) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_low_rank_equals_the_plain_formula(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 12, generator=gen).to(dtype)
    h = torch.randn(3, 5, 4, generator=gen).to(dtype)
    b = torch.randn(12, 4, generator=gen).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    expected = _plain(y.float(), h.float(), b.float(), 0.5)
    out = add_low_rank(y, h, b, 0.5)
    assert out.shape == y.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **tol)
    y_before = y.clone()
    assert torch.equal(y, y_before)  # out of place by default
    same = add_low_rank(y, h, b, 0.5, inplace=True)
    assert same is y  # written into y
    torch.testing.assert_close(y.float(), expected, **tol)


def test_add_low_rank_in_place_on_a_slice_of_a_fused_output() -> None:
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(2, 7, 3 * 8, generator=gen)
    untouched = fused.clone()
    part = fused.narrow(-1, 8, 8)  # the k slice: strided, not contiguous
    h, b = torch.randn(2, 7, 3, generator=gen), torch.randn(8, 3, generator=gen)
    expected = _plain(part.clone(), h, b, 2.0)
    assert add_low_rank(part, h, b, 2.0, inplace=True) is part
    torch.testing.assert_close(fused[..., 8:16], expected)
    assert torch.equal(fused[..., :8], untouched[..., :8])
    assert torch.equal(fused[..., 16:], untouched[..., 16:])


def test_add_low_rank_gradients_equal_the_plain_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(*s, generator=gen, requires_grad=True) for s in [(4, 6), (4, 3), (6, 3)]]
    y, h, b = leaves
    grad_out = torch.randn(4, 6, generator=gen)
    (add_low_rank(y, h, b, 0.7) * grad_out).sum().backward()
    fast = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (_plain(y, h, b, 0.7) * grad_out).sum().backward()
    for f, t in zip(fast, leaves):
        torch.testing.assert_close(f, t.grad)


def _pair(name: str, seed: int = 0) -> tuple[unipeft.DeltaModel, unipeft.DeltaModel]:
    """The same LoRA twice: with shared down-projections, and with sharing switched off."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)  # A's initialisation draws from the global generator
        model = unipeft.apply(BACKBONES[name].make(), "lora", r=3, targets=all_linear(name))
        perturb(model, seed=seed)
        models.append(model)
    fast, plain = models
    for d in plain.modules():
        if isinstance(d, LoraDelta):
            d._shared = None
    return fast, plain


def _to_hooks(model: unipeft.DeltaModel) -> unipeft.DeltaModel:
    """Switch off the fused Linear forward: every module back to an output hook."""
    for host in model._hosts.values():
        if getattr(host, "_overriding", False):
            del host.module.forward
            host._overriding = False
            host._handles.append(host.module.register_forward_hook(host._hook, with_kwargs=True))
    return model


def _groups(model: torch.nn.Module) -> set[int]:
    return {id(d._shared) for d in model.modules() if isinstance(d, LoraDelta) and d._shared}


@pytest.mark.parametrize("name", backbones())
def test_shared_down_projection_equals_separate_ones(name: str) -> None:
    fast, plain = (_to_hooks(m) for m in _pair(name))  # the hook path, where sharing acts
    assert _groups(fast), "no projections were found to share an input"
    assert not _groups(plain)
    bb = BACKBONES[name]
    inputs = bb.sample(seed=3)
    with torch.no_grad():  # the in-place inference path
        torch.testing.assert_close(bb.run(fast, inputs), bb.run(plain, inputs))
    # gradients in float64: fp32 rounding differences (the order of a matmul's sums) are
    # amplified through the tiny random models; in float64 both paths agree to 1e-12
    fast.double().train()
    plain.double().train()
    inputs = bb.sample(seed=3, dtype=torch.float64)
    bb.run(fast, inputs).square().sum().backward()
    bb.run(plain, inputs).square().sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-10, rtol=1e-9)


def test_shared_down_projection_runs_once_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's fused qkv: the q, k and v slices take their columns of one projection; with
    gradients the whole fused output is one node per group."""
    fast, _ = _pair("timm_vit")
    calls: list[int] = []
    real = SharedDown.down

    def counting(self: SharedDown, delta: LoraDelta, x: torch.Tensor) -> torch.Tensor:
        before = self._h
        out = real(self, delta, x)
        calls.append(int(before is None))
        return out

    whole: list[int] = []
    real_whole = lora_mod._slices_with_grad

    def counting_whole(shared, slices, x, y):  # type: ignore[no-untyped-def]
        whole.append(len(slices))
        return real_whole(shared, slices, x, y)

    monkeypatch.setattr(SharedDown, "down", counting)
    monkeypatch.setattr(lora_mod, "_slices_with_grad", counting_whole)
    bb = BACKBONES["timm_vit"]
    groups = len(_groups(fast))
    assert groups == 2  # the qkv of each of the two blocks
    bb.run(fast, bb.sample())  # with gradients: one node over each fused output
    assert whole == [3] * groups and not calls
    whole.clear()
    fast = _to_hooks(fast)
    with torch.no_grad():
        bb.run(fast, bb.sample())
    assert whole == []  # without gradients the update goes into the output in place
    shared = [d._shared for d in fast.modules() if isinstance(d, LoraDelta) and d._shared]
    assert all(s._h is None for s in shared)  # nothing held once every member took its part


@pytest.mark.parametrize("targets", [["attn.q", "attn.v"], ["attn.v", "attn.k"]])
def test_fused_slices_with_gaps_match_separate_slices(targets: list[str]) -> None:
    """Slices that leave rows of the fused output to the base alone (q and v of a qkv):
    the one-node update equals slice-by-slice updates, values and gradients (float64)."""
    bb = BACKBONES["timm_vit"]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = unipeft.apply(bb.make(), "lora", r=3, targets=targets)
        perturb(model, seed=0)
        models.append(model.double().train())
    fast, plain = models
    assert _groups(fast)
    for d in plain.modules():
        if isinstance(d, LoraDelta):
            d._shared = None
    inputs = bb.sample(seed=3, dtype=torch.float64)
    out_f, out_p = bb.run(fast, inputs), bb.run(plain, inputs)
    torch.testing.assert_close(out_f, out_p, atol=1e-12, rtol=1e-10)
    out_f.square().sum().backward()
    out_p.square().sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-10, rtol=1e-9)


def test_a_member_called_with_another_input_computes_its_own() -> None:
    fast = _to_hooks(_pair("llama")[0])  # the hook path shares q/k/v's projection
    layer = fast.base_model.layers[0].self_attn
    q = layer.q_proj
    k = layer.k_proj
    gen = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    dq = fast.deltas["default"]["layers__0:attn__q"]
    dk = fast.deltas["default"]["layers__0:attn__k"]
    with torch.no_grad():
        yq = q(x1)
        yk = k(x2)  # not the tensor q saw
        expected_k = F.linear(x2, k.weight) + F.linear(F.linear(x2, dk.A), dk.B) * dk.scaling
        expected_q = F.linear(x1, q.weight) + F.linear(F.linear(x1, dq.A), dq.B) * dq.scaling
    torch.testing.assert_close(yk, expected_k)
    torch.testing.assert_close(yq, expected_q)


def test_a_changed_factor_is_not_served_from_the_cache() -> None:
    fast = _to_hooks(_pair("llama")[0])
    layer = fast.base_model.layers[0].self_attn
    d = fast.deltas["default"]["layers__0:attn__k"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer.q_proj(x)  # computes the group's projection for q, k and v
        d.A.mul_(2.0)  # k's A changes before k runs
        out = layer.k_proj(x)
        expected = F.linear(x, layer.k_proj.weight) + d.scaling * F.linear(F.linear(x, d.A), d.B)
    torch.testing.assert_close(out, expected)


def test_dropout_in_training_does_not_share() -> None:
    model = unipeft.apply(
        BACKBONES["llama"].make(), "lora", r=2, dropout=0.5, targets=all_linear("llama")
    )
    model.train()
    group = next(d._shared for d in model.modules() if isinstance(d, LoraDelta))
    assert group is not None
    bb = BACKBONES["llama"]
    bb.run(model, bb.sample()).sum().backward()
    assert group._h is None  # never used: each projection drew its own dropout mask


def test_deltas_with_shared_projections_copy_and_pickle() -> None:
    fast, _ = _pair("timm_vit")
    x = torch.randn(2, 5, 32)
    members = next(d._shared.members for d in fast.modules() if isinstance(d, LoraDelta))
    with torch.no_grad():
        expected = [m(x, torch.zeros(2, 5, 32)) for m in members]
    for clone in (copy.deepcopy(fast.deltas), pickle.loads(pickle.dumps(fast.deltas))):
        groups = _groups(clone)
        assert groups and not groups & _groups(fast)  # the copy has groups of its own
        for d in clone.modules():
            if isinstance(d, LoraDelta) and d._shared is not None:
                assert any(m is d for m in d._shared.members)
        copies = next(d._shared.members for d in clone.modules() if isinstance(d, LoraDelta))
        with torch.no_grad():
            for m, e in zip(copies, expected):
                torch.testing.assert_close(m(x, torch.zeros(2, 5, 32)), e)


def test_mixed_batch_in_place_equals_per_sample_forwards() -> None:
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "lora", r=2, targets=all_linear("llama"), adapter_name="a")
    model.add_adapter("b", "lora", r=4, targets=["attn.q", "mlp.down"])
    perturb(model, seed=5, adapter="a")
    perturb(model, seed=6, adapter="b")
    inputs = bb.sample(seed=7)
    names = ["b", "a"]
    with torch.no_grad():
        with model.mixed_batch(names):
            mixed = bb.outputs(model, inputs)[0]
        rows = []
        for i, n in enumerate(names):
            model.set_active(n)
            one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()}
            rows.append(bb.outputs(model, one)[0])
    torch.testing.assert_close(mixed, torch.cat(rows), atol=1e-5, rtol=1e-4)


CHILD_CONFIG = {"unipelt": {"prompt_tokens": 0}}  # its projection and adapter children only


@pytest.mark.parametrize("method", methods(family=("hybrid", "moe")))
def test_hybrid_and_mixture_children_are_not_updated_in_place(method: str) -> None:
    """Hybrid and mixture methods (UniPELT, MoE-LoRA) compute ``child(x, y) - y``: the
    child must not write into y."""
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), method, **CHILD_CONFIG.get(method, {}))
    perturb(model, seed=8)
    inputs = bb.sample()
    with torch.no_grad():
        a = bb.run(model, inputs)
    b = bb.run(model, inputs)  # with gradients: every step out of place
    torch.testing.assert_close(a, b.detach())
    with model.disable(), torch.no_grad():
        assert not torch.allclose(bb.run(model, inputs), a)


def test_lora_module_uses_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmerged forward issues one addmm per site instead of matmul, scale and add."""
    seen: list[str] = []
    real = torch.addmm

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append("addmm")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2, targets=["attn.q", "attn.v"])
    model.train()
    bb = BACKBONES["bert"]
    bb.run(model, bb.sample())
    assert len(seen) == 2 * 2  # two sites in each of two layers


# compiling takes 5 to 10 s a backbone: these run by default, every other backbone is `slow`
COMPILED_BY_DEFAULT = {
    "llama": "separate Linear projections and a gated MLP, the shared down-projection path",
    "timm_vit": "a fused qkv projection, adapted slice by slice",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if name in COMPILED_BY_DEFAULT else pytest.mark.slow)
        for name in backbones()
    ],
)
def test_torch_compile_traces_the_adapted_model_in_one_graph(name: str) -> None:
    """``torch.compile(fullgraph=True)`` fails on any graph break: the hooks and LoRA's fast
    paths trace as plain tensor code, and the compiled model computes the same values."""
    fast, _ = _pair(name)
    fast.double().train()  # float64: see test_shared_down_projection_equals_separate_ones
    bb = BACKBONES[name]
    inputs = bb.sample(seed=9, dtype=torch.float64)
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}

    def run(**kw: torch.Tensor) -> torch.Tensor:
        return bb.run(fast, kw)

    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    got = compiled(**tensors)
    expected = run(**tensors)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    got.square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.requires_grad}
    fast.zero_grad()
    expected.square().sum().backward()
    for n, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(compiled_grads[n], p.grad, atol=1e-10, rtol=1e-9)


def test_shared_projection_under_inference_mode() -> None:
    fast, plain = _pair("llama")
    bb = BACKBONES["llama"]
    inputs = bb.sample(seed=10)
    with torch.inference_mode():
        got = bb.run(fast, inputs)
        expected = bb.run(plain, inputs)
    torch.testing.assert_close(got, expected)


def _fused_pair(name: str) -> tuple[unipeft.DeltaModel, unipeft.DeltaModel]:
    """The same LoRA with the fused Linear forward, and with it switched off (hooks only)."""
    fast, plain = _pair(name)
    return fast, _to_hooks(plain)


@pytest.mark.parametrize("name", backbones())
def test_fused_linear_equals_the_hook_path(name: str) -> None:
    fast, plain = _fused_pair(name)
    bb = BACKBONES[name]
    # hosts of a module (an nn.MultiheadAttention's host routes the whole attention instead)
    hosted = [h.module for h in fast._hosts.values() if hasattr(h, "module")]
    fused_modules = [m for m in hosted if "forward" in m.__dict__]
    assert fused_modules  # Linear (and GPT-2 Conv1D) sites run the fused forward
    inputs = bb.sample(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(bb.run(fast, inputs), bb.run(plain, inputs))
    fast.double().train()
    plain.double().train()
    # the base weights also train here, so the fused backward's weight gradients are checked
    names = {n for n, mod in fast.base_model.named_modules() if "forward" in mod.__dict__}
    for m in (fast, plain):
        for n, mod in m.base_model.named_modules():
            if n in names:
                mod.requires_grad_(True)
    inputs = bb.sample(seed=11, dtype=torch.float64)
    bb.run(fast, inputs).square().sum().backward()
    bb.run(plain, inputs).square().sum().backward()
    grads = dict(plain.named_parameters())
    checked = 0
    for n, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-10, rtol=1e-9)
            checked += 1
    assert checked > len(list(fast.deltas.parameters()))


def test_fused_forward_is_removed_with_the_last_adapter() -> None:
    model = unipeft.apply(BACKBONES["llama"].make(), "lora", r=2, targets=["attn.q"])
    q = model.base_model.layers[0].self_attn.q_proj
    assert "forward" in q.__dict__ and not q._forward_hooks  # PyTorch's fast call path
    backbone = model.unload()
    assert all("forward" not in m.__dict__ for m in backbone.modules())
    assert not q._forward_hooks


def test_fused_forward_steps_aside_for_two_adapters_and_mixed_batches() -> None:
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "lora", r=2, targets=["attn.q"], adapter_name="a")
    model.add_adapter("b", "lora", r=3, targets=["attn.q"])
    perturb(model, seed=12, adapter="a")
    perturb(model, seed=13, adapter="b")
    q = model.base_model.layers[0].self_attn.q_proj
    da, db = model.deltas["a"]["layers__0:attn__q"], model.deltas["b"]["layers__0:attn__q"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = F.linear(x, q.weight)
        lo_a = da.scaling * F.linear(F.linear(x, da.A), da.B)
        lo_b = db.scaling * F.linear(F.linear(x, db.A), db.B)
        model.set_active(["a", "b"])
        torch.testing.assert_close(q(x), base + lo_a + lo_b)
        model.set_active("b")
        torch.testing.assert_close(q(x), base + lo_b)
        with model.disable():
            torch.testing.assert_close(q(x), base)
        with model.mixed_batch(["a", "b"]):
            got = q(x)
        torch.testing.assert_close(got, torch.stack([(base + lo_a)[0], (base + lo_b)[1]]))


def test_calling_forward_directly_does_not_confuse_the_hook() -> None:
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "lora", r=2, targets=["attn.q"])
    perturb(model, seed=14)
    q = model.base_model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        direct = q.forward(x)  # no hooks run for a direct call
        called = q(x)
    torch.testing.assert_close(direct, called)
    assert not torch.allclose(called, F.linear(x, q.weight))


@pytest.mark.parametrize("name", backbones(where=lambda bb: has_fused_qkv(bb.name)))
def test_fused_output_block_update_equals_slice_by_slice(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without gradients, all q/k/v slices of a fused projection take one block matmul."""
    fast, plain = _pair(name)
    calls: list[int] = []
    real = lora_mod.update_fused_slices

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(lora_mod, "update_fused_slices", counting)
    bb = BACKBONES[name]
    inputs = bb.sample(seed=15)
    with torch.no_grad():
        got = bb.run(fast, inputs)
        got_again = bb.run(fast, inputs)  # the stacked factors are reused
        assert calls and all(calls)  # every fused output took the block path
        expected = bb.run(plain, inputs)  # no shared group: slice by slice
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_again, got)
    # a factor changed in place is seen at once
    d = next(m for m in fast.modules() if isinstance(m, LoraDelta) and m._shared)
    name_of_d = next(n for n, m in fast.named_modules() if m is d)
    p = dict(plain.named_modules())[name_of_d]
    with torch.no_grad():
        d.B.mul_(3.0)
        p.B.mul_(3.0)
        torch.testing.assert_close(
            bb.run(fast, inputs), bb.run(plain, inputs), atol=1e-5, rtol=1e-5
        )


def test_fused_backward_scaling_and_gradients_on_a_linear() -> None:
    """The fused node's gradients equal autograd's on the plain formula (float64)."""
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [x, w, b, a, bb]
    g = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    (lora_linear(x, w, b, a, bb, 0.75, False) * g).sum().backward()
    fused = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = F.linear(x, w, b) + 0.75 * F.linear(F.linear(x, a), bb)
    (ref * g).sum().backward()
    for f, t in zip(fused, leaves):
        torch.testing.assert_close(f, t.grad, atol=1e-12, rtol=1e-12)
    # GPT-2 Conv1D layout: the weight stored (in, out)
    for t in leaves:
        t.grad = None
    wt = w.detach().t().contiguous().requires_grad_(True)
    (lora_linear(x, wt, b, a, bb, 0.75, True) * g).sum().backward()
    torch.testing.assert_close(wt.grad, fused[1].t(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, fused[0], atol=1e-12, rtol=1e-12)


def test_masked_mixed_batch_follows_factor_changes_and_base_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bool] = []
    real = mixed_mod._mixed_masked

    def on_cpu_too(deltas, x, y, slots, cache):  # type: ignore[no-untyped-def]
        out = real(deltas, x, y, slots, cache)
        calls.append(out is not None)
        return out

    # the masked path runs on GPUs; take it on the CPU here to check its values
    monkeypatch.setattr(mixed_mod, "_mixed_masked", on_cpu_too)
    monkeypatch.setattr(
        LoraDelta,
        "mixed",
        staticmethod(
            lambda deltas, x, y, slots, cache: (
                on_cpu_too(deltas, x, y, slots, cache) if not torch.is_grad_enabled() else None
            )
        ),
    )
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "lora", r=2, targets=all_linear("llama"), adapter_name="a")
    model.add_adapter("b", "lora", r=4, targets=all_linear("llama"))
    perturb(model, seed=17, adapter="a")
    perturb(model, seed=18, adapter="b")
    inputs = bb.sample(seed=19)
    names = ["b", "__base__"]

    def expected() -> list[torch.Tensor]:
        rows = []
        for i, n in enumerate(names):
            one = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()}
            if n == "__base__":
                with model.disable():
                    rows.append(bb.outputs(model, one)[0])
            else:
                model.set_active(n)
                rows.append(bb.outputs(model, one)[0])
        return rows

    with torch.no_grad():
        for _ in range(2):  # the second call reuses the routing, its mask and the stacks
            with model.mixed_batch(names):
                got = bb.outputs(model, inputs)[0]
            for i, row in enumerate(expected()):
                torch.testing.assert_close(
                    got[i : i + 1, : row.shape[1]], row, atol=1e-5, rtol=1e-4
                )
        next(iter(model.deltas["b"].values())).B.mul_(-2.0)  # seen by the next mixed call
        with model.mixed_batch(names):
            got = bb.outputs(model, inputs)[0]
        torch.testing.assert_close(got[:1], expected()[0], atol=1e-5, rtol=1e-4)
    assert calls and all(calls)


def test_a_gated_mlp_down_projection_keeps_no_copy_of_its_input() -> None:
    """Llama's down projection reads ``silu(gate) * up``; autograd keeps both factors, so the
    fused node keeps them too instead of the product: no saved tensor has the product's
    storage, and the gradients equal the hook path's (float64)."""
    fast, plain = _fused_pair("llama")
    fast.double().train()
    plain.double().train()
    inputs = BACKBONES["llama"].sample(seed=33, dtype=torch.float64)
    down = fast.base_model.layers[0].mlp.down_proj
    seen: dict[str, torch.Tensor] = {}
    down.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = BACKBONES["llama"].run(fast, inputs)
    assert seen["x"].untyped_storage().data_ptr() not in saved
    out.square().sum().backward()
    BACKBONES["llama"].run(plain, inputs).square().sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-10, rtol=1e-9)
