"""P-tuning: parity with Hugging Face PEFT's P_TUNING (MLP and LSTM prompt encoders) both
ways on GPT-2 (whole outputs) and BERT (the soft tokens, and BERT run on them), the encoder
itself against PEFT's ``PromptEncoder`` with the same weights, the parameter formula, and
refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _parity import base, close, randomise  # noqa: E402

import unipeft  # noqa: E402
from unipeft import ConfigError, LoadError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

P = 3
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
ENCODERS = ["MLP", "LSTM"]


def run(model: nn.Module, **kw) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kw).last_hidden_state


def peft_model(backbone: nn.Module, encoder: str, hidden: int = 16) -> nn.Module:
    config = peft.PromptEncoderConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=P,
        encoder_reparameterization_type=encoder,
        encoder_hidden_size=hidden,
        encoder_num_layers=2,
    )
    model = peft.get_peft_model(backbone, config).eval()
    randomise(p for p in model.parameters() if p.requires_grad)
    return model


def peft_tokens(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model.get_prompt(batch_size=1)[0]


def bert_on(backbone: nn.Module, tokens: Tensor, **kw) -> Tensor:
    """BERT with ``tokens`` before the whole input (where PEFT puts them), as PEFT runs it."""
    with torch.no_grad():
        embeds = backbone.get_input_embeddings()(IDS)
        x = torch.cat([tokens.expand(len(IDS), -1, -1), embeds], dim=1)
        return backbone(inputs_embeds=x, **kw).last_hidden_state


@pytest.mark.parametrize("encoder", ENCODERS)
def test_from_peft_gpt2(encoder: str, tmp_path: Path) -> None:
    backbone = base("gpt2")
    theirs = peft_model(copy.deepcopy(backbone), encoder)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(backbone), tmp_path)
    cfg = ours.adapters["default"].config
    assert (cfg.encoder, cfg.inference_mode, cfg.num_tokens) == (encoder.lower(), True, P)
    assert cfg.encoder_hidden_size == 16
    assert (run(ours) - run(backbone)).abs().max() > 1e-2  # not the identity
    for kw in ({}, {"attention_mask": MASK}):
        # PEFT runs its live encoder; the folder holds its outputs; PEFT keeps its tokens
        what = f"gpt2 {encoder} PEFT -> unipeft{' (masked)' if kw else ''}"
        close(run(ours, **kw), run(theirs, **kw)[:, P:], what)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_to_peft_gpt2(encoder: str, tmp_path: Path) -> None:
    backbone = base("gpt2")
    ours = unipeft.apply(
        copy.deepcopy(backbone), "p_tuning", num_tokens=4, encoder=encoder.lower(),
        encoder_hidden_size=8,
    ).eval()  # fmt: skip
    randomise(ours.deltas.parameters())
    with pytest.warns(UserWarning, match="encoder outputs only"):
        interop.save(ours, tmp_path)
    cfg = json.loads((tmp_path / interop.CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "P_TUNING" and cfg["encoder_reparameterization_type"] == encoder
    assert cfg["num_virtual_tokens"] == 4 and cfg["encoder_hidden_size"] == 8
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(backbone), str(tmp_path)).eval()
    for kw in ({}, {"attention_mask": MASK}):
        what = f"gpt2 {encoder} unipeft -> PEFT{' (masked)' if kw else ''}"
        close(run(theirs, **kw)[:, 4:], run(ours, **kw), what)
    # and back: PEFT's folder loads as the same tokens
    again = interop.load(copy.deepcopy(backbone), tmp_path)
    close(run(again), run(ours), f"gpt2 {encoder} unipeft -> PEFT -> unipeft")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_bert_both_ways(encoder: str, tmp_path: Path) -> None:
    """On BERT PEFT puts its tokens before [CLS] and unipeft after it (see prompt tuning),
    so whole outputs differ by design; the soft tokens, and BERT run on them, agree."""
    backbone = base("bert")
    theirs = peft_model(copy.deepcopy(backbone), encoder)
    theirs.save_pretrained(str(tmp_path / "peft"))
    with pytest.warns(UserWarning, match="differ from PEFT's by design"):
        ours = interop.load(copy.deepcopy(backbone), tmp_path / "peft")
    tokens = ours.deltas["default"]["tokens"].tokens(1)
    close(tokens[0], peft_tokens(theirs), f"bert {encoder} PEFT -> unipeft tokens")
    for kw in ({}, {"attention_mask": MASK}):
        full = {"attention_mask": torch.cat([torch.ones(2, P, dtype=MASK.dtype), MASK], 1)}
        close(
            bert_on(backbone, tokens, **(full if kw else {})),
            run(theirs, **kw),
            f"bert {encoder} PEFT -> unipeft outputs{' (masked)' if kw else ''}",
        )
    assert run(ours).shape == (2, 7, 32)

    mine = unipeft.apply(copy.deepcopy(backbone), "p_tuning", num_tokens=P, encoder=encoder.lower())
    randomise(mine.deltas.parameters(), seed=3)
    with pytest.warns(UserWarning) as caught:
        interop.save(mine, tmp_path / "mine")
    notes = " ".join(str(w.message) for w in caught)
    assert "index 1" in notes and "encoder outputs only" in notes
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(backbone), str(tmp_path / "mine"))
    loaded.eval()
    with torch.no_grad():
        want = mine.deltas["default"]["tokens"].tokens(1)
    close(peft_tokens(loaded), want[0], f"bert {encoder} unipeft -> PEFT tokens")
    close(run(loaded), bert_on(backbone, want), f"bert {encoder} unipeft -> PEFT outputs")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_matches_peft_prompt_encoder(encoder: str) -> None:
    """With PEFT's live encoder weights copied in, unipeft's encoder computes PEFT's tokens
    (the folders carry only outputs, so this is where the encoder's maths is compared)."""
    backbone = base("gpt2")
    theirs = peft_model(copy.deepcopy(backbone), encoder, hidden=12)
    ours = unipeft.apply(
        copy.deepcopy(backbone), "p_tuning", num_tokens=P, encoder=encoder.lower(),
        encoder_hidden_size=12,
    ).eval()  # fmt: skip
    delta = ours.deltas["default"]["tokens"]
    src = theirs.prompt_encoder["default"].state_dict()
    renamed = {
        k.replace("embedding.weight", "embedding")
        .replace("lstm_head.", "lstm.")
        .replace("mlp_head.", "mlp."): v
        for k, v in src.items()
    }
    delta.load_state_dict(renamed, strict=True)  # the same parameters, one to one
    close(delta.tokens(1)[0].detach(), peft_tokens(theirs), f"{encoder} encoder")
    close(run(ours), run(theirs)[:, P:], f"gpt2 {encoder} live encoders")


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"encoder": "lstm"},
        {"encoder": "lstm", "encoder_num_layers": 3, "encoder_hidden_size": 5},
        {"encoder_hidden_size": 7},
        {"inference_mode": True},
    ],
)
def test_parameter_count(cfg: dict) -> None:
    bb = BACKBONES["gpt2"]
    model = unipeft.apply(bb.make(), "p_tuning", num_tokens=4, **cfg)
    real = sum(p.numel() for p in model.deltas.parameters() if p.requires_grad)
    site = model.adapters["default"].sites[0]
    spec = model.adapters["default"].method
    assert spec.num_parameters(model.adapters["default"].config, site) == real


def test_gradients_reach_the_encoder() -> None:
    bb = BACKBONES["timm_vit"]
    model = unipeft.apply(bb.make(), "p_tuning", num_tokens=2, encoder="lstm")
    bb.run(model, bb.sample()).sum().backward()
    grads = [p.grad for p in model.deltas.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="encoder"):
        unipeft.apply(base("gpt2"), "p_tuning", encoder="gru")
    with pytest.raises(unipeft.TargetError, match="sequence"):
        unipeft.apply(base("gpt2"), "p_tuning", targets=["attn.q"])
    # a BERT position table of 512 leaves room for at most 511 soft tokens
    with pytest.raises(ConfigError, match="num_tokens"):
        unipeft.apply(base("bert"), "p_tuning", num_tokens=600)
    # exporting soft tokens that are not on a text sequence
    vit = unipeft.apply(BACKBONES["timm_vit"].make(), "p_tuning", num_tokens=2)
    with pytest.raises(unipeft.AdapterError, match="one Hugging Face text token sequence"):
        interop.save(vit, tmp_path / "vit")
    # a PEFT folder whose tensor does not fit the backbone
    theirs = peft_model(base("gpt2"), "MLP")
    theirs.save_pretrained(str(tmp_path / "peft"))
    wide = transformers.GPT2Model(
        transformers.GPT2Config(
            n_embd=48,
            n_layer=1,
            n_head=2,
            vocab_size=100,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    with pytest.raises(LoadError, match="prompt_embeddings"):
        interop.load(wide, tmp_path / "peft")
