"""A model and its backbone are freed once the user drops them.

The registry of wrapped backbones (one handle per backbone) holds its keys weakly; a value
that referred to the handle, and through it to the backbone, kept every adapted model ever
built alive (a benchmark that builds one model after another measured the first one's
memory in the second)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import unipeft
from unipeft.contract.errors import AdapterError


def _backbone() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_a_dropped_model_and_its_backbone_are_freed():
    backbone = _backbone()
    model = unipeft.apply(backbone, "lora", r=2, targets=["attn.q", "mlp.up"])
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    gone = weakref.ref(backbone), weakref.ref(model)
    del backbone, model
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_a_live_backbone_still_refuses_a_second_handle():
    backbone = _backbone()
    first = unipeft.apply(backbone, "lora", r=2)
    with pytest.raises(AdapterError, match="another handle"):
        unipeft.apply(backbone, "lora", r=2)
    first.unload()
    unipeft.apply(backbone, "lora", r=2)  # handed back: a new handle may take it
