"""X-LoRA: outputs against PEFT's XLoraModel on a tiny BERT with the same LoRA experts
(folders saved by PEFT) and the same classifier weights; experts from unipeft folders; the
one-pass fallback; refusals.

What is compared: the adapted output of PEFT's two-pass forward and of
:func:`xlora_forward`. PEFT's X-LoRA checkpoint folder is not compared (unipeft neither reads
nor writes it); the classifier is copied tensor by tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from _parity import IDS, close, make, randomise  # noqa: E402

import unipeft  # noqa: E402
from unipeft import ConfigError  # noqa: E402
from unipeft.methods.moe.xlora import XLoraDelta, xlora_forward  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class Wrapped(torch.nn.Module):
    """BERT under a ``.model`` attribute: PEFT's X-LoRA renames the experts' keys to
    ``model.<...>``, which fits only models that keep their body there (``*ForCausalLM``)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.model = body
        self.config = body.config

    def forward(self, **kwargs):
        return self.model(**kwargs)


TARGETS = [r"model\.encoder\.layer\.\d+\.attention\.self\.(query|value)"]


def _experts(base: torch.nn.Module, root: Path, n: int = 3) -> list[str]:
    folders = []
    for e in range(n):
        cfg = peft.LoraConfig(r=2 + e, lora_alpha=4, target_modules=["query", "value"])
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        randomise([p for n_, p in pm.named_parameters() if "lora_" in n_], seed=10 + e)
        pm.save_pretrained(str(root / f"e{e}"))
        folders.append(str(root / f"e{e}"))
    return folders


CASES = {
    "default": {},
    "layerwise_topk": {"layerwise_scalings": True, "top_k_lora": 2, "softmax_temperature": 0.5},
    "deep_softmax_topk": {
        "xlora_depth": 3, "xlora_size": 8, "xlora_dropout_p": 0.0, "enable_softmax": False,
        "enable_softmax_topk": True, "top_k_lora": 2, "global_scaling_weight": 0.7,
    },
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_output_as_peft_xlora(tmp_path: Path, case: str) -> None:
    base = Wrapped(make("bert"))
    base.config.use_cache = False
    folders = _experts(base, tmp_path)
    opts = CASES[case]

    xcfg = peft.XLoraConfig(
        hidden_size=32, adapters={str(i): f for i, f in enumerate(folders)}, **opts
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), xcfg).eval()
    classifier = theirs.base_model.internal_xlora_classifier
    randomise(classifier.parameters(), seed=3)

    ours = unipeft.apply(
        copy.deepcopy(base), "xlora", experts=folders, hidden_size=32, targets=TARGETS,
        **opts,
    ).eval()  # fmt: skip
    shared = ours.adapters["default"].shared
    shared.layers.load_state_dict(classifier.layers.state_dict())

    with torch.no_grad():
        want = theirs(input_ids=IDS).last_hidden_state
        got = xlora_forward(ours, input_ids=IDS).last_hidden_state
        plain = base(input_ids=IDS).last_hidden_state
    assert (want - plain).abs().max() > 1e-2, "the experts did not move the output"
    close(got, want, f"X-LoRA vs PEFT ({case})")


def test_unipeft_folders_and_one_pass_fallback(tmp_path: Path) -> None:
    bb = unipeft.registry().tiny_backbone("gpt2")
    folders = []
    for e in range(2):
        m = unipeft.apply(bb.make(), "lora", r=2, targets=["attn.q", "attn.v"])
        randomise([p for p in m.parameters() if p.requires_grad], seed=e)
        m.save(str(tmp_path / f"u{e}"))
        folders.append(str(tmp_path / f"u{e}"))
    model = unipeft.apply(bb.make(), "xlora", experts=folders, targets=["attn.q", "attn.v"])
    # the experts' tensors were copied: frozen buffers, not trained
    assert model.num_trainable_parameters() == (32 + 1) * 2
    delta = next(d for d in model.deltas.modules() if isinstance(d, XLoraDelta))
    assert not any(p.requires_grad for n, p in delta.named_parameters())
    assert delta.A0.shape == (2, 32)

    # with the classifier giving expert 0 everything, the output is LoRA 0's
    with torch.no_grad():
        layer = model.adapters["default"].shared.layers[-1]
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([50.0, -50.0]))
    lora0 = unipeft.load(bb.make(), folders[0])
    inputs = bb.sample(0)
    want = bb.run(lora0, inputs)
    close(bb.run(model, inputs), want, "one-pass X-LoRA, expert 0 only, vs LoRA 0")
    got = xlora_forward(model, **inputs).last_hidden_state.flatten()
    close(got, want[: got.numel()], "two-pass X-LoRA, expert 0 only, vs LoRA 0")

    # a plain forward trains the classifier
    out = bb.run(model, inputs).sum()
    out.backward()
    assert model.adapters["default"].shared.layers[-1].weight.grad is not None


def test_refusals(tmp_path: Path) -> None:
    bb = unipeft.registry().tiny_backbone("bert")
    with pytest.raises(ConfigError, match=r"experts.*not folders"):
        unipeft.apply(bb.make(), "xlora", experts=[str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match=r"hidden_size=32 but .*mlp.down.*width 64"):
        unipeft.apply(bb.make(), "xlora", hidden_size=32, targets=["mlp.down"])
    with pytest.raises(ValueError, match=r"no xlora adapter"):
        xlora_forward(unipeft.apply(bb.make(), "lora"), input_ids=IDS)
