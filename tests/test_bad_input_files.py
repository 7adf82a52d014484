"""Bad files: a unipeft save, a PEFT folder or a trainer checkpoint, mutated one way each.

Every case asserts the error type, that the message names the culprit (the file, and the
JSON path of the field or the name of the tensor), that the model is exactly as it was and
that the folder's files are byte-identical: a refused load changes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _bad_cases_peft_checkpoint import CHECKPOINT, PEFT
from _bad_cases_unipeft import SAFETENSORS, UNIPEFT
from _bad_files import (
    CONFIG,
    KEY,
    SITE,
    WEIGHTS,
    Mutation,
    edit,
    put,
    sets,
    tensors,
    to_v1,
)
from _state import files, fingerprint
from torch import nn

import unipeft
from unipeft import LoadError
from unipeft.features.interop import peft as interop
from unipeft.testing.backbones import BACKBONES
from unipeft.training import Trainer, TrainerConfig
from unipeft.training.task import TextClassifier, classification_loss

CASES = [
    *(pytest.param("unipeft", *c[1:], id=f"save-json-{c[0]}") for c in UNIPEFT),
    *(pytest.param("unipeft", *c[1:], id=f"safetensors-{c[0]}") for c in SAFETENSORS),
    *(pytest.param("peft", *c[1:], id=f"peft-{c[0]}") for c in PEFT),
    *(pytest.param("checkpoint", *c[1:], id=f"checkpoint-{c[0]}") for c in CHECKPOINT),
]


# ----------------------------------------------------------------------------- folders


def _model() -> unipeft.DeltaModel:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2, targets=["attn.q", "attn.v"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return TextClassifier(unipeft.apply(BACKBONES["bert"].make(), "lora", r=2), 32, 2).train()


DATA = [
    {
        "input_ids": x,
        "attention_mask": torch.ones(8, dtype=torch.long),
        "label": (x[0] >= 50).long(),
    }
    for x in torch.randint(1, 100, (16, 8), generator=torch.Generator().manual_seed(1))
]
TRAIN = TrainerConfig(steps=2, batch_size=8, lr=1e-2, device="cpu", log_every=1)


def _trainer(model: nn.Module, out: Path) -> Trainer:
    return Trainer(model, classification_loss, DATA, TRAIN, output_dir=out, progress=False)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder of each kind, written once; each case mutates a copy."""
    root = tmp_path_factory.mktemp("originals")
    model = _model()
    model.save(str(root / "unipeft"))
    interop.save(model, root / "peft")
    _trainer(_classifier(), root / "run").train()
    return {"unipeft": root / "unipeft", "peft": root / "peft", "checkpoint": root / "run"}


def _load(kind: str, folder: Path, model: nn.Module) -> None:
    if kind == "unipeft":
        unipeft.load(model, str(folder))
    elif kind == "peft":
        interop.load(model, folder)
    else:
        _trainer(model, folder.parent).train(resume=True)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(("kind", "mutate", "error", "fragments"), CASES)
def test_a_bad_file_is_refused_and_changes_nothing(
    kind: str,
    mutate: Mutation,
    error: type[Exception],
    fragments: list[str],
    originals: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(originals[kind], out)
    folder = out / "checkpoint" if kind == "checkpoint" else out
    mutate(folder)
    model = _classifier() if kind == "checkpoint" else BACKBONES["bert"].make()
    before, on_disk = fingerprint(model), files(out)
    with pytest.raises(error) as info:
        _load(kind, folder, model)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert fingerprint(model) == before
    assert files(out) == on_disk


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 80
    kinds = {c.values[0] for c in CASES}
    assert kinds == {"unipeft", "peft", "checkpoint"}


def test_the_untouched_folders_load(originals: dict[str, Path], tmp_path: Path) -> None:
    """The cases fail because of their mutation: each original loads."""
    unipeft.load(BACKBONES["bert"].make(), str(originals["unipeft"]))
    interop.load(BACKBONES["bert"].make(), originals["peft"])
    shutil.copytree(originals["checkpoint"], tmp_path / "run")
    assert _trainer(_classifier(), tmp_path / "run").train(resume=True).step == 2


def test_a_format_version_1_save_still_loads(originals: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    shutil.copytree(originals["unipeft"], folder)
    edit(CONFIG, to_v1)(folder)
    loaded = unipeft.load(BACKBONES["bert"].make(), str(folder))
    expected = unipeft.load(BACKBONES["bert"].make(), str(originals["unipeft"]))
    for key, value in expected.deltas.state_dict().items():
        assert torch.equal(loaded.deltas.state_dict()[key], value), key


def test_unchecked_is_the_checksum_opt_out(originals: dict[str, Path], tmp_path: Path) -> None:
    """A weights file edited by hand loads once its config says ``"unchecked"``; its
    tensors are still checked against the config."""
    folder = tmp_path / "edited"
    shutil.copytree(originals["unipeft"], folder)
    tensors(WEIGHTS, put(KEY, torch.ones(2, 32)), False)(folder)
    with pytest.raises(LoadError, match="checksum differs"):
        unipeft.load(BACKBONES["bert"].make(), str(folder))
    edit(CONFIG, sets("weights_sha256", value="unchecked"))(folder)
    loaded = unipeft.load(BACKBONES["bert"].make(), str(folder))
    assert torch.equal(
        loaded.deltas.state_dict()["default.encoder__layer__0:attn__q.A"], torch.ones(2, 32)
    )


def test_a_half_precision_save_loads_into_a_float32_backbone(tmp_path: Path) -> None:
    """Floating dtypes convert on load, as before: only what the file says must match."""
    model = unipeft.apply(BACKBONES["bert"].make(torch.float16), "lora", r=2)
    model.save(str(tmp_path))
    doc = json.loads((tmp_path / CONFIG).read_text())
    assert doc["adapters"]["default"]["sites"][SITE]["A"]["dtype"] == "float16"
    loaded = unipeft.load(BACKBONES["bert"].make(), str(tmp_path))
    assert all(t.dtype == torch.float32 for t in loaded.deltas.state_dict().values())
