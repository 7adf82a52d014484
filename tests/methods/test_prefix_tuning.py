"""Prefix tuning: parity with Hugging Face PEFT's PREFIX_TUNING both ways on BERT, GPT-2 and
Llama (with and without the reparameterisation MLP), greedy generation, the vision hosts
(timm, Hugging Face ViT, open_clip) against a hand-written attention, causality of the
open_clip text tower, several adapters at once, refusals."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.maps.tiny import BUILTIN_TINY_BACKBONES  # noqa: E402

TINY = {tb.name: tb for tb in BUILTIN_TINY_BACKBONES}
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
P = 4


def run(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


def compare(got: Tensor, want: Tensor, base: Tensor, what: str) -> float:
    """``got`` equals ``want`` at float32 tolerance (on the unpadded positions), and the
    adapter moved the output."""
    keep = MASK.bool()
    diff = (got - want)[keep].abs().max().item()
    scale = max(1.0, want.abs().max().item())
    moved = (want - base)[keep].abs().max().item()
    print(f"{what}: max |diff| = {diff:.3e} (scale {scale:.3g}, adapter moved it {moved:.3g})")
    assert moved > 1e-2, f"{what}: the adapter is (nearly) the identity, nothing compared"
    assert diff <= 1e-5 * scale, f"{what}: {diff:.3e}"
    return diff


def peft_prefix(base: nn.Module, projection: bool) -> nn.Module:
    config = peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=P,
        prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
    )
    model = peft.get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_from_peft(arch: str, projection: bool, tmp_path: Path) -> None:
    base = TINY[arch].make()
    theirs = peft_prefix(copy.deepcopy(base), projection)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "prefix_tuning" and adapter.config.num_tokens == P
    assert [s.name for s in adapter.sites] == ["tokens"]
    compare(run(ours), run(theirs), run(base), f"{arch} PEFT -> unipeft (projection={projection})")


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_to_peft(arch: str, projection: bool, tmp_path: Path) -> None:
    base = TINY[arch].make()
    cfg = {"prefix_projection": projection, "encoder_hidden_size": 24} if projection else {}
    ours = unipeft.apply(copy.deepcopy(base), "prefix_tuning", num_tokens=P, **cfg).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    compare(run(theirs), run(ours), run(base), f"{arch} unipeft -> PEFT (projection={projection})")


def test_position_ids_shift_like_peft(tmp_path: Path) -> None:
    """Explicit position_ids move on by P, as PEFT moves them."""
    base = TINY["llama"].make()
    theirs = peft_prefix(copy.deepcopy(base), False)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path)
    pos = torch.arange(7).expand(2, -1)
    with torch.no_grad():
        want = theirs(input_ids=IDS, attention_mask=MASK, position_ids=pos).last_hidden_state
        got = ours(input_ids=IDS, attention_mask=MASK, position_ids=pos).last_hidden_state
    compare(got, want, run(base), "llama with position_ids")


def _greedy_uncached(model: nn.Module, ids: Tensor, steps: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache): the reference for generate()."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generation_matches_peft(arch: str, tmp_path: Path) -> None:
    """KV-cache generation: the prefill fills the cache with the prefix, later steps widen
    the mask. The tokens equal greedy decoding through PEFT's model without a cache; on
    GPT-2 also PEFT's own generate(). (PEFT 0.21.2's generate() on Llama with transformers
    5 drops the prefix and gives the base model's tokens, so it is not the reference there.)"""
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        base = transformers.GPT2LMHeadModel(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=100, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        base = transformers.LlamaForCausalLM(cfg).eval()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.normal_(0, 0.5)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path)
    ids = IDS[:1, :5]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _greedy_uncached(theirs, ids, 6)
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
        peft_gen = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        plain = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    print(
        f"{arch} greedy: PEFT uncached {reference} unipeft generate {got} "
        f"PEFT generate {peft_gen[0].tolist()} base {plain[0].tolist()}"
    )
    assert got == reference
    assert got != plain[0].tolist()  # the prefix changed the continuation
    if arch == "gpt2":
        assert got == peft_gen[0].tolist()


# ----------------------------------------------------------------------------- vision hosts


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
    """softmax(q [pk; k]^T / sqrt(d)) [pv; v], written out; (N, H, L, d) with prefixes
    (N, H, P, d)."""
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def test_timm_attention_against_reference() -> None:
    model = TINY["timm_vit"].make()
    dm = unipeft.apply(model, "prefix_tuning", num_tokens=3)
    attn = model.blocks[0].attn
    delta = dm.deltas["default"][dm.adapters["default"].sites[0].name.replace(".", "__")]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = attn(x)
        n, h, hd = 2, attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(x).reshape(n, 5, 3, h, hd).permute(2, 0, 3, 1, 4)
        pk, pv = (t.unflatten(-1, (h, hd)).transpose(1, 2) for t in delta.prefix(n))
        out = _reference_attention(q, k, v, pk, pv).transpose(1, 2).reshape(n, 5, h * hd)
        want = attn.proj(out)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name, path",
    [("hf_vit", "layers.0.attention"), ("videomae", "encoder.layer.0.attention.attention")],
)
def test_hf_vision_attention_against_reference(name: str, path: str) -> None:
    """Hugging Face ViT (q_proj/k_proj/v_proj/o_proj) and VideoMAE (query/key/value, no
    output projection inside) self-attention with a prefix."""
    model = TINY[name].make()
    dm = unipeft.apply(model, "prefix_tuning", num_tokens=3)
    attn = model.get_submodule(path)
    site = next(s for s in dm.adapters["default"].sites if s.name.endswith("0:attn"))
    delta = dm.adapters["default"].delta_at(site)
    x = torch.randn(2, 5, 32)
    names = ("q_proj", "k_proj", "v_proj") if hasattr(attn, "q_proj") else ("query", "key", "value")
    with torch.no_grad():
        got = attn(x)[0]
        hd = 32 // model.config.num_attention_heads
        q, k, v = (getattr(attn, n)(x).unflatten(-1, (-1, hd)).transpose(1, 2) for n in names)
        pk, pv = (t.unflatten(-1, (-1, hd)).transpose(1, 2) for t in delta.prefix(2))
        want = _reference_attention(q, k, v, pk, pv).transpose(1, 2).reshape(2, 5, -1)
        if hasattr(attn, "o_proj"):
            want = attn.o_proj(want)
    assert (got - want).abs().max() < 1e-5


def test_open_clip_text_tower_stays_causal() -> None:
    """A change to the last token leaves the earlier positions' outputs alone (the prefix is
    visible to every position, the future is not), and both towers are adapted."""
    tb = TINY["open_clip"]
    model = tb.make()
    dm = unipeft.apply(model, "prefix_tuning", num_tokens=3)
    towers = {s.tower for s in dm.adapters["default"].sites}
    assert towers == {"visual", "text"}
    text = tb.sample()["text"]
    other = text.clone()
    other[:, -1] = (other[:, -1] + 1) % 100
    feats = {}

    def keep(mod: nn.Module, args: tuple, out: Tensor) -> None:
        feats["x"] = out

    handle = model.transformer.register_forward_hook(keep)
    with torch.no_grad():
        dm.encode_text(text)
        a = feats["x"]
        dm.encode_text(other)
        b = feats["x"]
    handle.remove()
    a, b = (t if t.shape[0] == 2 else t.transpose(0, 1) for t in (a, b))
    assert (a[:, :-1] - b[:, :-1]).abs().max() < 1e-6
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def test_mha_need_weights_path_matches_sdpa() -> None:
    """nn.MultiheadAttention called directly (need_weights=True: the explicit path) and with
    need_weights=False (sdpa) agree with a prefix; the weights cover the real keys."""
    model = TINY["open_clip"].make()
    unipeft.apply(model, "prefix_tuning", num_tokens=3, targets=["visual/attn"])
    mha = model.visual.transformer.resblocks[0].attn
    x = torch.randn(2, 5, 32)
    if not mha.batch_first:
        x = x.transpose(0, 1)
    with torch.no_grad():
        slow, weights = mha(x, x, x, need_weights=True)
        fast, _ = mha(x, x, x, need_weights=False)
    assert (slow - fast).abs().max() < 1e-5
    assert weights.shape[-1] == 5


# ----------------------------------------------------------------------------- lifecycle


def test_two_adapters_concatenate_prefixes() -> None:
    """Two prefix adapters active together attend over both prefixes: the same output as
    one adapter holding the concatenated prefix."""
    base = TINY["gpt2"].make()
    dm = unipeft.apply(copy.deepcopy(base), "prefix_tuning", num_tokens=2)
    dm.add_adapter("b", "prefix_tuning", num_tokens=3)
    dm.set_active(["default", "b"])
    one = unipeft.apply(copy.deepcopy(base), "prefix_tuning", num_tokens=5)
    a, b = dm.deltas["default"]["tokens"].kv, dm.deltas["b"]["tokens"].kv
    with torch.no_grad():
        one.deltas["default"]["tokens"].kv.copy_(torch.cat([a, b], dim=0))
    compare(run(dm), run(one), run(base), "two adapters")


def test_prompt_and_prefix_adapters_together() -> None:
    """Soft prompts (in the sequence) and a prefix (in the cache) active together: the
    outputs keep their shape and differ from either alone."""
    dm = unipeft.apply(TINY["gpt2"].make(), "prefix_tuning", num_tokens=2)
    dm.add_adapter("p", "prompt_tuning", num_tokens=3, init_std=0.5)
    dm.set_active(["default", "p"])
    both = run(dm)
    dm.set_active("p")
    prompt = run(dm)
    dm.set_active("default")
    prefix = run(dm)
    assert both.shape == prompt.shape == (2, 7, 32)
    assert (both - prompt).abs().max() > 1e-3 and (both - prefix).abs().max() > 1e-3


def test_mixed_batch_refused() -> None:
    dm = unipeft.apply(TINY["bert"].make(), "prefix_tuning", num_tokens=2)
    with pytest.raises(ValueError, match="mixed batches with soft prompts or prefixes"):
        dm(input_ids=IDS, attention_mask=MASK, adapter_names=["default", "__base__"])


def test_refusals() -> None:
    with pytest.raises(unipeft.TargetError, match="target 'tokens'"):
        unipeft.apply(TINY["bert"].make(), "prefix_tuning", targets=["attn"])
    with pytest.raises(unipeft.TargetError, match="target 'attn'"):
        unipeft.apply(TINY["timm_vit"].make(), "prefix_tuning", targets=["tokens"])
    with pytest.raises(unipeft.TargetError, match="attn"):
        unipeft.apply(TINY["timm_vit"].make(), "prefix_tuning", targets=["mlp"])
    with pytest.raises(unipeft.ConfigError, match="num_tokens"):
        unipeft.apply(TINY["bert"].make(), "prefix_tuning", num_tokens=0)
    with pytest.raises(unipeft.ConfigError, match="num_tokens"):
        unipeft.apply(TINY["gpt2"].make(), "prefix_tuning", num_tokens=64)


def test_export_refuses_vision(tmp_path: Path) -> None:
    dm = unipeft.apply(TINY["timm_vit"].make(), "prefix_tuning", num_tokens=2)
    with pytest.raises(unipeft.AdapterError, match="PEFT's prefix tuning covers"):
        interop.save(dm, tmp_path)


def test_projection_trains_the_shared_mlp() -> None:
    tb = TINY["timm_vit"]
    dm = unipeft.apply(tb.make(), "prefix_tuning", num_tokens=3, prefix_projection=True)
    tb.run(dm, tb.sample()).sum().backward()
    shared = [p for n, p in dm.named_parameters() if p.requires_grad]
    assert shared and all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)


def test_unload_restores_forward() -> None:
    for name in ("timm_vit", "open_clip", "hf_vit", "bert"):
        tb = TINY[name]
        model = tb.make()
        x = tb.sample()
        before = tb.run(model, x)
        dm = unipeft.apply(model, "prefix_tuning", num_tokens=2)
        assert (tb.run(dm, x) - before).abs().max() > 1e-4
        dm.unload()
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert torch.equal(tb.run(model, x), before)


def test_sdpa_mask_helper_bool_and_float() -> None:
    from unipeft.runtime.attention_host import _prefixed_mask

    q = torch.zeros(1, 1, 3, 4)
    causal = _prefixed_mask(None, True, 3, 2, q)
    assert causal.shape == (3, 5) and causal[:, :2].all() and not causal[0, 3]
    float_mask = _prefixed_mask(torch.full((3, 3), -1.0), False, 3, 2, q)
    assert float_mask.shape == (3, 5) and float(float_mask[0, 0]) == 0.0
    assert F.softmax(float_mask, -1).shape == (3, 5)
