"""Hugging Face ``transformers.Trainer`` on a unipeft model: LoRA trains, the backbone stays.

Two things in core keep the Trainer from working with its default arguments (both are
reported, not patched here):

* ``DeltaModel.forward(*args, adapter_names=None, **kwargs)`` hides the backbone's
  signature. The Trainer keeps only the batch columns named in ``inspect.signature(
  model.forward)`` (``remove_unused_columns=True``, the default), so it drops
  ``input_ids``/``attention_mask``/``labels`` and fails with "The batch received was empty".
* ``DeltaModel.num_parameters()`` takes no arguments, overriding the backbone's
  ``PreTrainedModel.num_parameters(only_trainable=False, exclude_embeddings=False)``; the
  Trainer calls ``model.num_parameters(exclude_embeddings=True)`` to count FLOs: TypeError.

The first test is the plain use, expected to fail until core handles both; the second shows
that with ``remove_unused_columns=False`` and a ``num_parameters`` that accepts the
backbone's arguments the unmodified Trainer trains the adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import unipeft


def _model() -> tuple[unipeft.DeltaModel, BertForSequenceClassification]:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        num_labels=2,
    )
    backbone = BertForSequenceClassification(config)
    return unipeft.apply(backbone, "lora", r=4), backbone


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 100, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]


def _train(model: torch.nn.Module, out: Path, **args: object) -> None:
    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=5,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        **args,  # type: ignore[arg-type]
    )
    Trainer(model=model, args=arguments, train_dataset=_data()).train()


def _check_trained(model: unipeft.DeltaModel, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    lora = [n for n in after if n.startswith("deltas.")]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(after[n], before[n]) for n in lora), "a LoRA factor did not train"
    backbone = [n for n in after if n.startswith("base_model.")]
    assert backbone and all(torch.equal(after[n], before[n]) for n in backbone)


def test_hf_trainer_with_default_arguments(tmp_path: Path) -> None:
    model, _ = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, tmp_path)
    _check_trained(model, before)


def test_handle_shows_the_backbone_signature() -> None:
    """What the Trainer reads: the backbone's argument names (and adapter_names)."""
    import inspect

    model, backbone = _model()
    names = list(inspect.signature(model.forward).parameters)
    assert names[:2] == list(inspect.signature(backbone.forward).parameters)[:2]
    assert "adapter_names" in names and "labels" in names
    assert model.num_parameters(only_trainable=True) == model.num_trainable_parameters()
    embeddings = backbone.bert.embeddings.word_embeddings.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) <= model.num_parameters() - embeddings
