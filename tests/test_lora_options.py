"""LoRA's options: PiSSA/OLoRA initialisation (residual in the weights, exact everywhere),
LoRA+ learning-rate ratios, and DoRA through the PEFT interop, against the real ``peft``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402

ATOL = 2e-5


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=5,
    ).eval()  # fmt: skip


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "bert":
            return model(input_ids=IDS).last_hidden_state
        return model(IMG)


CASES = {
    "bert": (
        bert,
        ["query", "value", "intermediate.dense"],
        [r".*\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (vit, ["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}


def randomise(module: nn.Module, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- PiSSA / OLoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", list(CASES))
def test_residual_inits_are_exact_everywhere(init: str, kind: str) -> None:
    make, _, targets = CASES[kind]
    base = make()
    original = state(base)
    ref = run(base, kind)
    model = unipeft.apply(copy.deepcopy(base), "lora", r=4, init=init, targets=targets)
    assert torch.allclose(run(model, kind), ref, atol=ATOL)  # the identity at init
    live = dict(model.base_model.named_parameters())
    changed = [k for k, v in original.items() if k in live and not torch.equal(live[k], v)]
    assert changed, "the residual W - s·B₀A₀ is not in the weights"
    randomise(model.deltas)
    trained = run(model, kind)
    assert not torch.allclose(trained, ref, atol=1e-3)
    with model.disable():  # the base's exact bits while disabled
        assert all(torch.equal(p, original[k]) for k, p in model.base_model.named_parameters())
        assert torch.equal(run(model, kind), ref)
    batch = {"bert": IDS, "vit": IMG}[kind]
    with torch.no_grad():
        mixed = model(batch, adapter_names=["default", "__base__"])
    mixed = mixed.last_hidden_state if kind == "bert" else mixed
    assert torch.allclose(mixed[0], trained[0], atol=ATOL)
    assert torch.equal(mixed[1], ref[1])  # the base sample sees W, not the residual
    model.merge()
    assert torch.allclose(run(model, kind), trained, atol=ATOL)
    model.unmerge()
    assert torch.allclose(run(model, kind), trained, atol=ATOL)
    back = model.unload()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())


def test_residual_init_saves_and_loads(tmp_path: Path) -> None:
    base = bert()
    model = unipeft.apply(copy.deepcopy(base), "lora", r=4, init="pissa", targets=["attn.q"])
    randomise(model.deltas)
    want = run(model, "bert")
    model.save(str(tmp_path))
    loaded = unipeft.load(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(run(loaded, "bert"), want, atol=ATOL)


def test_two_adapters_one_residual_each_way() -> None:
    """A PiSSA adapter inactive leaves the weights alone for the other adapter."""
    base = bert()
    ref = run(base, "bert")
    model = unipeft.apply(copy.deepcopy(base), "lora", r=4, init="pissa", targets=["attn.q"])
    model.add_adapter("plain", "lora", r=2, targets=["attn.q"])
    randomise(model.deltas)
    model.set_active(["plain"])
    alone = unipeft.apply(copy.deepcopy(base), "lora", r=2, targets=["attn.q"])
    alone.deltas["default"].load_state_dict(model.deltas["plain"].state_dict())
    assert torch.allclose(run(model, "bert"), run(alone, "bert"), atol=ATOL)
    model.set_active([])
    assert torch.equal(run(model, "bert"), ref)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", list(CASES))
def test_residual_init_exports_the_equal_plain_lora(init: str, kind: str, tmp_path: Path) -> None:
    make, _, targets = CASES[kind]
    base = make()
    model = unipeft.apply(copy.deepcopy(base), "lora", r=3, init=init, targets=targets)
    randomise(model.deltas)
    want = run(model, kind)
    interop.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert theirs.peft_config["default"].r == 6
    assert torch.allclose(run(theirs, kind), want, atol=ATOL)


# ----------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("kind", list(CASES))
def test_dora_from_peft(kind: str, tmp_path: Path) -> None:
    make, names, _ = CASES[kind]
    base = make()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=names, use_dora=True)
    ).eval()
    randomise(theirs)
    want = run(theirs, kind)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path)
    assert ours.get_adapter("default").method.id == "dora"
    got = run(ours, kind)
    print(f"dora {kind} peft->unipeft max |diff| = {(got - want).abs().max().item():.2e}")
    assert torch.allclose(got, want, atol=ATOL)
    merged_theirs = theirs.merge_and_unload().state_dict()
    ours.merge()
    mine = ours.base_model.state_dict()
    worst = max((mine[k] - v).abs().max().item() for k, v in merged_theirs.items())
    print(f"dora {kind} merged weights max |diff| = {worst:.2e}")
    assert worst < ATOL


@pytest.mark.parametrize("kind", list(CASES))
def test_dora_to_peft(kind: str, tmp_path: Path) -> None:
    make, _, targets = CASES[kind]
    base = make()
    ours = unipeft.apply(copy.deepcopy(base), "dora", r=2, alpha=4, targets=targets)
    randomise(ours.deltas)
    want = run(ours, kind)
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    got = run(theirs, kind)
    print(f"dora {kind} unipeft->peft max |diff| = {(got - want).abs().max().item():.2e}")
    assert torch.allclose(got, want, atol=ATOL)


# ----------------------------------------------------------------------------- LoRA+


def test_loraplus_groups_give_b_the_ratio() -> None:
    model = unipeft.apply(bert(), "lora", r=2, loraplus_lr_ratio=16.0)
    groups = unipeft.param_groups(model, lr=1e-3, weight_decay=0.1)
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in groups}
    b_ids = {id(d.B) for d in model.deltas["default"].values()}
    a_ids = {id(d.A) for d in model.deltas["default"].values()}
    assert by_lr[0.016] == b_ids and by_lr[0.001] == a_ids
    assert all(g["weight_decay"] == 0.1 for g in groups)
    plain = unipeft.apply(bert(), "lora", r=2)
    assert len(unipeft.param_groups(plain, lr=1e-3)) == 1


def test_loraplus_in_the_trainer() -> None:
    from unipeft.training import Trainer, TrainerConfig

    model = unipeft.apply(bert(), "dora", r=2, loraplus_lr_ratio=4.0)
    trainer = Trainer(
        model, lambda m, b: m(input_ids=b).last_hidden_state.pow(2).mean(), [IDS[0]] * 4,
        TrainerConfig(steps=1, batch_size=2, lr=1e-3), output_dir=None, progress=False,
    )  # fmt: skip
    opt, _ = trainer._optimizer(model)
    b_ids = {id(d.B) for d in model.deltas["default"].values()}
    for group in opt.param_groups:
        fast = {id(p) for p in group["params"]} == b_ids
        assert group["lr"] == pytest.approx(4e-3 if fast else 1e-3)
    assert len(opt.param_groups) == 2
