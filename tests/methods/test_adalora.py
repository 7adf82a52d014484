"""AdaLoRA: the rank allocator's schedule (by hand, with unipeft's Trainer and with an
unmodified ``transformers.Trainer``), its agreement with PEFT's ``RankAllocator``, and PEFT
folders both ways (with a ``rank_pattern`` that truncates the saved tensors) on BERT and a
timm ViT, merged weights included.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.adalora import AdaLoraAllocator, AdaLoraDelta  # noqa: E402
from unipeft.model import DeltaModel  # noqa: E402

ATOL = 1e-5
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6)
"""A schedule with every phase: warm-up (step 1), pruning (2-4), the final allocation (5),
fixed (6)."""

BERT_PEFT = ["query", "value", "intermediate.dense"]
BERT_OURS = [
    r"encoder\.layer\.\d+\.attention\.self\.(query|value)",
    r"encoder\.layer\.\d+\.intermediate\.dense",
]
VIT_PEFT = ["qkv", "fc1", "patch_embed.proj"]  # patch_embed.proj: an nn.Conv2d (SVDConv2d)
VIT_OURS = [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1", r"patch_embed\.proj"]


# ----------------------------------------------------------------------------- helpers


def _bert(classify: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    cls = transformers.BertForSequenceClassification if classify else transformers.BertModel
    return cls(cfg).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=5,
    ).eval()  # fmt: skip


def _inputs(kind: str, seed: int = 0) -> dict[str, Tensor] | Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "bert":
        return {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}
    return torch.randn(2, 3, 32, 32, generator=g)


def _run(model: nn.Module, kind: str, seed: int = 0) -> Tensor:
    x = _inputs(kind, seed)
    if kind == "bert":
        return model(**x).last_hidden_state  # type: ignore[arg-type]
    return model(x)


def _loss(model: nn.Module, kind: str, seed: int) -> Tensor:
    out = _run(model, kind, seed)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
    return (out * w).sum()


def _randomise_peft(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _randomise(model: DeltaModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in _deltas(model).values():
            for p in (delta.A, delta.E, delta.B):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _deltas(model: DeltaModel, adapter: str = "default") -> dict[str, AdaLoraDelta]:
    a = model.adapters[adapter]
    return {s.name: a.delta_at(s) for s in a.sites}  # type: ignore[misc]


def _allocator(model: DeltaModel, adapter: str = "default") -> AdaLoraAllocator:
    shared = model.adapters[adapter].shared
    assert isinstance(shared, AdaLoraAllocator)
    return shared


def _kept(model: DeltaModel) -> int:
    return sum(d.rank() for d in _deltas(model).values())


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _peft(base: nn.Module, targets: list[str], **kw: Any) -> nn.Module:
    cfg = peft.AdaLoraConfig(target_modules=targets, lora_alpha=6, lora_dropout=0.0, **kw)
    return peft.get_peft_model(base, cfg)


# ----------------------------------------------------------------------------- the maths


def test_identity_at_init_and_the_mask_in_forward_and_merge() -> None:
    base = _bert()
    model = unipeft.apply(copy.deepcopy(base), "adalora", **SCHEDULE)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, "bert"), _run(base, "bert"), atol=0, rtol=0)
    _randomise(model)
    delta = next(iter(_deltas(model).values()))
    x = torch.randn(3, 32)
    y = torch.randn(3, 32)
    with torch.no_grad():
        delta.mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        s = delta.scaling
        assert s == pytest.approx(8.0 / (4 + 1e-5))  # alpha / (init_r + 1e-5), as PEFT
        keep = [0, 2]
        dw = s * delta.B[:, keep] @ (delta.A[keep] * delta.E[keep, None])
        torch.testing.assert_close(delta(x, y), y + x @ dw.t(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(delta.delta_weight(), dw, atol=1e-6, rtol=1e-6)
        w = torch.randn(32, 32)
        torch.testing.assert_close(delta.merged(w, None)[0], w + dw, atol=1e-6, rtol=1e-6)


def test_orthogonality_regulariser_is_peft_mean_over_factors() -> None:
    model = unipeft.apply(_bert(), "adalora", orth_reg_weight=0.3, **SCHEDULE)
    _randomise(model)
    norms = []
    for d in _deltas(model).values():
        eye = torch.eye(4)
        norms.append(torch.linalg.matrix_norm(d.A @ d.A.t() - eye))
        norms.append(torch.linalg.matrix_norm(d.B.t() @ d.B - eye))
    aux = model.aux_loss()
    assert aux is not None
    torch.testing.assert_close(aux, 0.3 * torch.stack(norms).mean())
    assert unipeft.apply(_bert(), "adalora", orth_reg_weight=0.0).aux_loss() is None


def test_config_refuses_a_schedule_without_pruning_phase() -> None:
    with pytest.raises(unipeft.ConfigError, match="target_r"):
        unipeft.apply(_bert(), "adalora", init_r=2, target_r=3)
    with pytest.raises(unipeft.ConfigError, match="tinit"):
        unipeft.apply(_bert(), "adalora", tinit=5, tfinal=5, total_step=10)


# ----------------------------------------------------------------------------- the schedule


def _masks(model: DeltaModel) -> dict[str, list[bool]]:
    return {n: (d.mask != 0).tolist() for n, d in _deltas(model).items()}


def test_allocator_matches_peft_rank_allocator() -> None:
    """Identical models and gradients (no optimizer step): after every backward, our masks
    are PEFT's rank_pattern (PEFT's update_and_allocate called with the same step)."""
    base = _bert()
    schedule = {**SCHEDULE, "total_step": 8, "deltaT": 2}
    pm = _peft(copy.deepcopy(base), ["query", "value"], **schedule)
    _randomise_peft(pm)
    ours = unipeft.apply(
        copy.deepcopy(base), "adalora", alpha=6.0, orth_reg_weight=0.0,
        targets=[r"encoder\.layer\.\d+\.attention\.self\.(query|value)"],
        **{k if k != "deltaT" else "delta_t": v for k, v in schedule.items()},
    )  # fmt: skip
    with torch.no_grad():
        for name, delta in _deltas(ours).items():
            layer = pm.base_model.model.get_submodule(name)
            delta.A.copy_(layer.lora_A["default"])
            delta.E.copy_(layer.lora_E["default"].reshape(-1))
            delta.B.copy_(layer.lora_B["default"])
    pm.train()
    ours.train()
    changes = 0
    last = _masks(ours)
    for step in range(1, 9):
        _loss(pm, "bert", step).backward()
        pm.base_model.update_and_allocate(step)
        pm.zero_grad()
        _loss(ours, "bert", step).backward()  # the allocator runs at the end of backward
        ours.zero_grad()
        assert int(_allocator(ours).step) == step
        pattern = pm.peft_config["default"].rank_pattern
        mine = _masks(ours)
        if pattern is None:
            assert all(all(m) for m in mine.values()), f"step {step}: pruned before PEFT"
        else:
            theirs = {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
            assert mine == theirs, f"step {step}: masks {mine} != PEFT's {theirs}"
        changes += mine != last
        last = mine
    assert changes >= 2, "the masks should change at several allocations"
    assert _kept(ours) == 2 * 4
    with torch.no_grad():
        pm.eval()
        ours.eval()
        assert _diff(_run(pm, "bert"), _run(ours, "bert")) < ATOL


def test_budget_followed_and_importance_decides() -> None:
    """A plain loop with Adam: after every step the kept singular values over all sites are
    the schedule's budget; only layer 0's output enters the loss, so layer 1's singular
    values have no importance and are the ones pruned."""
    model = unipeft.apply(
        _bert(), "adalora", orth_reg_weight=0.0, targets=["attn.q", "attn.v"], **SCHEDULE
    )
    _randomise(model)
    model.train()
    alloc = _allocator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    seen = []
    for step in range(1, 8):
        out = model(**_inputs("bert", step), output_hidden_states=True).hidden_states[1]
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        seen.append(_kept(model))
    # the paper's cubic schedule, written out: 16 values at first (4 sites x init_r 4), 8 at
    # the end (x target_r 2); warm-up to tinit = 1, final allocation at 6 - tfinal = 5
    cubic = [int(8 * (1 - (t - 1) / 4) ** 3 + 8) for t in (2, 3, 4)]
    assert seen == [16, *cubic, 8, 8, 8]
    assert [alloc.budget(t)[0] for t in range(1, 6)] == seen[:5]
    assert alloc.finished
    ranks = {name: d.rank() for name, d in _deltas(model).items()}
    assert ranks == {
        "encoder.layer.0:attn.q": 4,
        "encoder.layer.0:attn.v": 4,
        "encoder.layer.1:attn.q": 0,
        "encoder.layer.1:attn.v": 0,
    }


def _classification_data(n: int = 16) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 100, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(n)
    ]


def _classifier(steps: int) -> DeltaModel:
    schedule = {**SCHEDULE, "total_step": steps}
    return unipeft.apply(_bert(classify=True), "adalora", **schedule).train()


def test_schedule_with_unipeft_trainer() -> None:
    from unipeft.training import Trainer, TrainerConfig

    steps = 7
    model = _classifier(steps)
    alloc = _allocator(model)
    n_sites = len(_deltas(model))
    during = []

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        # called before step k's backward: the allocation of step k - 1 is in place
        done = int(alloc.step)
        during.append((_kept(model), alloc.budget(done)[0] if done else 4 * n_sites))
        return m(**batch).loss

    cfg = TrainerConfig(steps=steps, lr=1e-2, batch_size=4)
    Trainer(model, loss_fn, _classification_data(), cfg, output_dir=None).train()
    assert all(kept == budget for kept, budget in during), during
    assert int(alloc.step) == steps and alloc.finished
    assert _kept(model) == 2 * n_sites
    assert len({d.rank() for d in _deltas(model).values()}) > 1, "ranks should differ by site"


def test_schedule_with_unmodified_hf_trainer(tmp_path: Path) -> None:
    steps = 7
    model = _classifier(steps)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True,
        remove_unused_columns=False,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=_classification_data()).train()
    alloc = _allocator(model)
    assert int(alloc.step) == steps and alloc.finished
    assert _kept(model) == 2 * len(_deltas(model))


# ----------------------------------------------------------------------------- PEFT interop


def _prune_peft(pm: nn.Module, kind: str) -> None:
    """PEFT's own allocator, by the book (update_and_allocate after each step), up to the
    final allocation (total_step 6, tfinal 1: step 5)."""
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, 6):
        _loss(pm, kind, step).backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()


def _prune_ours(model: DeltaModel, kind: str) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, 6):
        _loss(model, kind, step).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


CASES = {
    "bert": (_bert, BERT_PEFT, BERT_OURS),
    "timm_vit": (_vit, VIT_PEFT, VIT_OURS),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_folder_with_rank_pattern_loads(kind: str, tmp_path: Path) -> None:
    make, peft_targets, _ = CASES[kind]
    base = make()
    pm = _peft(copy.deepcopy(base), peft_targets, **SCHEDULE)
    _randomise_peft(pm)
    _prune_peft(pm, "bert" if kind == "bert" else "vit")
    pm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = [sum(v) for v in saved["rank_pattern"].values()]
    assert sum(kept) == 2 * len(kept) and min(kept) < 4, "the folder should be truncated"
    x = "bert" if kind == "bert" else "vit"
    with torch.no_grad():
        expected = _run(pm, x)
        ours = interop.load(copy.deepcopy(base), tmp_path).eval()
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        diff = _diff(_run(ours, x), expected)
        diff_peft = _diff(_run(again, x), expected)
    print(
        f"\n[adalora {kind}] PEFT -> unipeft max |diff| = {diff:.3e} (PEFT reload {diff_peft:.3e})"
    )
    assert diff < ATOL * max(1.0, expected.abs().max().item())
    assert _kept(ours) == sum(kept) and _allocator(ours).finished


@pytest.mark.parametrize("kind", list(CASES))
def test_unipeft_export_loads_in_peft_and_merges_the_same(kind: str, tmp_path: Path) -> None:
    make, _, our_targets = CASES[kind]
    x = "bert" if kind == "bert" else "vit"
    base = make()
    model = unipeft.apply(
        copy.deepcopy(base), "adalora", alpha=6.0, targets=our_targets, **SCHEDULE
    )
    _randomise(model)
    _prune_ours(model, x)
    ranks = [d.rank() for d in _deltas(model).values()]
    assert sum(ranks) == 2 * len(ranks) and min(ranks) < 4
    interop.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    assert sorted(sum(v) for v in saved["rank_pattern"].values()) == sorted(ranks)
    with torch.no_grad():
        expected = _run(model, x)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        diff = _diff(_run(pm, x), expected)
        # and back: unipeft reads what it wrote
        back = interop.load(copy.deepcopy(base), tmp_path).eval()
        diff_back = _diff(_run(back, x), expected)
        merged_peft = pm.merge_and_unload().state_dict()
        model.merge()
        merged_ours = model.base_model.state_dict()
    merged = max(_diff(merged_ours[k], v) for k, v in merged_peft.items() if v.is_floating_point())
    print(
        f"\n[adalora {kind}] unipeft -> PEFT max |diff| = {diff:.3e} (back into unipeft "
        f"{diff_back:.3e}); merged weights max |diff| = {merged:.3e}"
    )
    scale = max(1.0, expected.abs().max().item())
    assert diff < ATOL * scale and diff_back < ATOL * scale
    assert merged < 1e-6


def test_without_total_step_nothing_is_pruned_and_peft_still_loads(tmp_path: Path) -> None:
    """total_step=None (the default): a warning once, every singular value kept; the export
    has no rank_pattern and the shortest schedule PEFT accepts."""
    base = _bert()
    targets = [r"encoder\.layer\.\d+\.attention\.self\.(query|value)"]
    model = unipeft.apply(copy.deepcopy(base), "adalora", init_r=4, target_r=2, targets=targets)
    _randomise(model)
    model.train()
    with pytest.warns(UserWarning, match="total_step is not set"):
        _loss(model, "bert", 0).backward()
    _loss(model, "bert", 1).backward()  # no second warning (pytest's filter would show it)
    assert int(_allocator(model).step) == 2 and _kept(model) == 4 * 4
    model.eval()
    interop.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] is None and saved["total_step"] == 1
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        expected = _run(model, "bert")
        assert _diff(_run(pm, "bert"), expected) < ATOL * max(1.0, expected.abs().max().item())
