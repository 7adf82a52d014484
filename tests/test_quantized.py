"""Adapters on quantized bases (bitsandbytes NF4/FP4/int8, torchao int8/float8) on the CPU.

Every case compares with the same adapter on the dequantized full-precision twin of the
model (the weights the quantized layers compute with), or with PEFT's LoRA layers for
bitsandbytes on the same quantized model.
"""

from __future__ import annotations

import pytest
import torch
from _quantized import (
    BNB_KINDS,
    KINDS,
    METHODS,
    dequantized_twin,
    lm_loss,
    needs,
    perturb_,
    quantized_llama,
    quantized_state,
    tiny_llama,
)
from torch import nn

import unipeft
from unipeft import quantization as Q
from unipeft.contract.errors import MergeError

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore::unipeft.quantization.QuantizedMergeWarning"
)

CPU_KINDS = ("nf4", "fp4-dq", "int8", "torchao-int8", "torchao-fp8")
ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down")


def _tol(kind: str) -> float:
    # bitsandbytes' int8 layer quantizes its input rows too (LLM.int8()): its output is not
    # x Wᵀ of the dequantized W to float32 precision; every other kind dequantizes exactly
    return 1.5e-2 if kind == "int8" else 2e-5


IDS = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_quantized_linears_are_projection_sites(kind: str) -> None:
    model = quantized_llama(kind)
    sites = {s.role: s for s in unipeft.inspect_sites(model) if getattr(s, "layer", None) == 0}
    for role in ROLES:
        site = sites[role]
        assert site.is_projection and Q.is_quantized(site.module)
        ref = site.reference_tensor()
        assert ref.is_floating_point() and ref.dtype == torch.float32  # never the packed uint8
        w, _ = site.weight_views()
        assert w.shape == (site.module.out_features, site.module.in_features)
        assert torch.equal(w, Q.dequantized_weight(site.module))
    twin = dequantized_twin(model)
    with torch.no_grad():
        got, want = model(IDS).logits, twin(IDS).logits
    torch.testing.assert_close(got, want, atol=_tol(kind), rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", CPU_KINDS)
def test_outputs_equal_the_dequantized_twin(kind: str, method: str) -> None:
    model = quantized_llama(kind)
    twin = dequantized_twin(model)
    with torch.no_grad():
        base = twin(IDS).logits
    torch.manual_seed(3)
    qm = unipeft.apply(model, method, **METHODS[method])
    torch.manual_seed(3)
    rm = unipeft.apply(twin, method, **METHODS[method])
    for (k, p), (k2, p2) in zip(qm.deltas.named_parameters(), rm.deltas.named_parameters()):
        assert k == k2 and p.dtype == torch.float32
        torch.testing.assert_close(p, p2, atol=0, rtol=0)  # DoRA's magnitude: the same ‖W‖
    perturb_(qm)
    perturb_(rm)
    with torch.no_grad():
        got, want = qm(IDS).logits, rm(IDS).logits
    assert (want - base).abs().max() > 2 * _tol(kind)  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=_tol(kind), rtol=0)


@pytest.mark.parametrize(
    ("kind", "method"),
    [(k, "lora") for k in CPU_KINDS] + [("nf4", m) for m in METHODS if m != "lora"],
)
def test_training_moves_only_the_adapter(kind: str, method: str) -> None:
    model = quantized_llama(kind)
    before = quantized_state(model)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.is_floating_point() and not Q.is_quantized(p)
    }
    torch.manual_seed(5)
    dm = unipeft.apply(model, method, **METHODS[method])
    dm.train()
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("deltas.", "fusions.")) for n in trainable)
    opt = torch.optim.Adam([p for p in dm.parameters() if p.requires_grad], lr=2e-2)
    start = {n: p.detach().clone() for n, p in dm.deltas.named_parameters()}
    losses = []
    for _ in range(6):
        loss = lm_loss(dm, IDS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, start[n]) for n, p in dm.deltas.named_parameters())
    after = quantized_state(model)
    assert before.keys() == after.keys() and before
    for name, t in before.items():
        assert torch.equal(t, after[name]), f"{name} changed"
    for n, p in model.named_parameters():
        assert not p.requires_grad
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{n} changed"


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_save_and_load_round_trip(kind: str, tmp_path) -> None:
    torch.manual_seed(3)
    dm = unipeft.apply(quantized_llama(kind), "dora", **METHODS["dora"])
    perturb_(dm)
    with torch.no_grad():
        want = dm(IDS).logits
    dm.save(str(tmp_path))
    loaded = unipeft.load(quantized_llama(kind), str(tmp_path))
    saved = dict(loaded.deltas.named_parameters())
    assert saved.keys() == dict(dm.deltas.named_parameters()).keys()
    for k, p in dm.deltas.named_parameters():
        assert torch.equal(p, saved[k])
    with torch.no_grad():
        got = loaded(IDS).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("kind", CPU_KINDS)
def test_merge_requantizes_and_unmerge_restores_the_bytes(kind: str, method: str) -> None:
    model = quantized_llama(kind)
    torch.manual_seed(3)
    dm = unipeft.apply(model, method, **METHODS[method])
    perturb_(dm, scale=0.05)
    layers = {a.site.path: a for a in dm.get_adapter("default").attachments}
    params = {p: dm.base_model.get_submodule(p).weight for p in layers}
    before = quantized_state(model)
    with torch.no_grad():
        unmerged = dm(IDS).logits
        expected = {}
        for path, att in layers.items():
            w, b = att.site.weight_views()
            expected[path] = att.delta.merged(w, b)[0].float()
    with pytest.warns(Q.QuantizedMergeWarning, match="re-quantiz"):
        dm.merge()
    errors = Q.merge_errors(dm)
    assert errors.keys() == layers.keys()
    for path, err in errors.items():
        layer = dm.base_model.get_submodule(path)
        assert Q.is_quantized(layer) and layer.weight is not params[path]
        actual = (Q.dequantized_weight(layer).float() - expected[path]).abs().max().item()
        assert err == pytest.approx(actual, abs=1e-7)
    with torch.no_grad():
        merged = dm(IDS).logits
    assert (merged - unmerged).abs().max() < 0.5  # close, within the re-quantization error
    dm.unmerge()
    assert Q.merge_errors(dm) == {}
    for path, param in params.items():
        assert dm.base_model.get_submodule(path).weight is param
    after = quantized_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(dm(IDS).logits, unmerged)
    back = dm.unload()
    assert all(torch.equal(before[k], v) for k, v in quantized_state(back).items())
    assert not any(m._forward_hooks for m in back.modules())


def test_merge_refuses_a_format_it_cannot_requantize() -> None:
    needs("torchao-int8")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = tiny_llama()
    quantize_(model.model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    layer = model.model.layers[0].self_attn.q_proj
    assert Q.is_quantized(layer)
    twin = dequantized_twin(model)
    torch.manual_seed(3)
    dm = unipeft.apply(model, "lora", **METHODS["lora"])
    torch.manual_seed(3)
    rm = unipeft.apply(twin, "lora", **METHODS["lora"])
    perturb_(dm)
    perturb_(rm)
    with torch.no_grad():
        torch.testing.assert_close(dm(IDS).logits, rm(IDS).logits, atol=2e-5, rtol=0)
    with pytest.raises(MergeError, match=r"torchao.*IntxUnpackedToInt8Tensor.*dequantize_model"):
        dm.merge()
    assert not dm.merged


def test_unload_then_merge_on_a_dequantized_copy(tmp_path) -> None:
    needs("nf4")
    torch.manual_seed(3)
    dm = unipeft.apply(quantized_llama("nf4"), "lora", **METHODS["lora"])
    perturb_(dm)
    with torch.no_grad():
        want = dm(IDS).logits
    dm.save(str(tmp_path))
    full = Q.dequantize_model(dm.unload())
    assert not any(Q.is_quantized(m) for m in full.modules())
    merged = unipeft.load(full, str(tmp_path))
    merged.merge()  # full precision: exact, no warning
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, atol=2e-5, rtol=0)


def test_lora_fused_path_declines_quantized_weights() -> None:
    needs("torchao-int8")
    model = quantized_llama("torchao-int8")
    dm = unipeft.apply(model, "lora", r=4, targets=["attn.q"])
    delta = dm.get_adapter("default").attachments[0].delta
    layer = dm.get_adapter("default").attachments[0].site.module
    x = torch.randn(3, layer.in_features)
    assert delta.fused_linear(x, layer.weight, layer.bias, False) is None
    plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
    assert delta.fused_linear(x, plain.weight, None, False) is not None


@pytest.mark.parametrize("kind", BNB_KINDS)
def test_lora_equals_peft_on_the_same_bitsandbytes_model(kind: str, tmp_path) -> None:
    needs(kind)
    from peft import LoraConfig, PeftModel, get_peft_model

    modules = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(11)
    pm = get_peft_model(
        quantized_llama(kind), LoraConfig(r=4, lora_alpha=8, target_modules=modules)
    )
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith(
        "peft.tuners.lora.bnb"
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
        want = pm(input_ids=IDS).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    dm = unipeft.interop.peft.load(quantized_llama(kind), str(tmp_path / "peft"))
    with torch.no_grad():
        got = dm(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    unipeft.interop.peft.save(dm, str(tmp_path / "back"))
    again = PeftModel.from_pretrained(quantized_llama(kind), str(tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, want, atol=1e-5, rtol=0)


def test_prepare_quantized_upcasts_norms_and_checkpoints_with_gradients() -> None:
    needs("nf4")
    model = quantized_llama("nf4")
    model.to(torch.bfloat16)  # the non-quantized parameters in half precision
    before = quantized_state(model)
    Q.prepare_quantized(model, gradient_checkpointing=True, use_reentrant=True)
    for p in (model.model.norm.weight, model.lm_head.weight, model.model.embed_tokens.weight):
        assert p.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in quantized_state(model).items())
    assert model.is_gradient_checkpointing
    dm = unipeft.apply(model, "lora", r=4, targets=["attn.q", "attn.v"])
    dm.train()
    lm_loss(dm, IDS).backward()
    grads = [p.grad for p in dm.deltas.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_prepare_quantized_can_upcast_only_the_norms() -> None:
    needs("nf4")
    model = quantized_llama("nf4").to(torch.bfloat16)
    Q.prepare_quantized(model, upcast="norms")
    assert model.model.layers[1].post_attention_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(unipeft.ConfigError, match="upcast"):
        Q.prepare_quantized(model, upcast="some")


def test_dequantizes_a_weight_repacked_for_the_cpu_kernel() -> None:
    needs("nf4")

    model = tiny_llama()
    Q.quantize_linears(model, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.k_proj  # 64 -> 32: a multiple of the kernel's 32
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard layout")
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    standard = Q.dequantized_weight(layer)
    with torch.no_grad():
        layer.eval()
        y = layer(x)  # re-packs the weight in place
    assert layer.weight.quant_state.packing_format_for_cpu
    repacked = Q.dequantized_weight(layer)
    # the kernel's block scales are bfloat16: the same codes, scales rounded
    torch.testing.assert_close(repacked, standard, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(y.float(), (x @ repacked.t()).float(), atol=3e-2, rtol=2e-2)


def test_helpers_refuse_clearly() -> None:
    assert not Q.is_quantized(nn.Linear(4, 4))
    assert not Q.is_quantized(torch.zeros(3))
    with pytest.raises(unipeft.ConfigError, match="gradient_checkpointing_enable"):
        Q.prepare_quantized(nn.Sequential(nn.Linear(4, 4)), gradient_checkpointing=True)
    with pytest.raises(TypeError, match="DeltaModel"):
        Q.merge_errors(nn.Linear(4, 4))
    assert set(KINDS) >= set(CPU_KINDS)


def test_a_4bit_layer_whose_parameter_lost_its_subclass() -> None:
    """FSDP replaces ``Params4bit`` by a plain tensor of packed codes; the layer keeps its
    ``quant_state``, which unipeft (like bitsandbytes' own forward) reads instead."""
    needs("nf4")
    model = quantized_llama("nf4")
    twin = dequantized_twin(model)
    layer = model.model.layers[0].self_attn.q_proj
    want = Q.dequantized_weight(layer)
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    assert type(layer.weight) is nn.Parameter and Q.is_quantized(layer)
    torch.testing.assert_close(Q.dequantized_weight(layer), want, atol=0, rtol=0)
    torch.manual_seed(3)
    dm = unipeft.apply(model, "dora", **METHODS["dora"])
    torch.manual_seed(3)
    rm = unipeft.apply(twin, "dora", **METHODS["dora"])
    perturb_(dm)
    perturb_(rm)
    with torch.no_grad():
        torch.testing.assert_close(dm(IDS).logits, rm(IDS).logits, atol=2e-5, rtol=0)


def _fitting(method: str) -> dict:
    """Sizes that fit the tiny Llama where a method's defaults do not."""
    return {
        "c3a": dict(block_size=16),
        "road": dict(group_size=16),
        "vblora": dict(vector_length=16),
        "waveft": dict(n_frequency=100),
    }.get(method, {})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_every_method_that_attaches_runs_on_quantized_layers(kind: str) -> None:
    from unipeft.contract.errors import TargetError

    needs(kind)
    ran = []
    for spec in unipeft.list_methods():
        name = spec["id"] if isinstance(spec, dict) else spec.id
        model = quantized_llama(kind)
        twin = dequantized_twin(model)
        try:
            torch.manual_seed(3)
            dm = unipeft.apply(model, name, **_fitting(name))
        except TargetError:
            continue  # a vision or CLIP method: nothing to attach to on a Llama
        torch.manual_seed(3)
        rm = unipeft.apply(twin, name, **_fitting(name))
        perturb_(dm, scale=0.02)
        perturb_(rm, scale=0.02)
        with torch.no_grad():
            torch.testing.assert_close(dm(IDS).logits, rm(IDS).logits, atol=_tol(kind), rtol=0)
        lm_loss(dm, IDS).backward()
        assert any(p.grad is not None for p in dm.deltas.parameters())
        if dm.get_adapter("default").method.mergeable:
            before = quantized_state(model)
            dm.merge()
            dm.unmerge()
            assert all(torch.equal(before[k], v) for k, v in quantized_state(model).items())
        ran.append(name)
    assert {"lora", "dora", "ia3", "oft", "boft", "hra", "prompt_tuning"} <= set(ran)
