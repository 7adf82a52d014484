"""The bad-file cases of a PEFT folder and of a trainer checkpoint, in the same form as
_bad_cases_unipeft."""

from __future__ import annotations

from typing import Any

import torch
from _bad_files import (
    MODULE,
    PEFT_A,
    PEFT_B,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    both,
    cast,
    delete,
    drops,
    edit,
    pop,
    put,
    raw,
    sets,
    tensors,
)

from unipeft import LoadError
from unipeft.training import CheckpointError

PEFT: list[Any] = [
    (
        "config-list",
        edit(PEFT_CONFIG, lambda d: [d]),
        LoadError,
        [PEFT_CONFIG, "top level is a JSON array"],
    ),
    ("config-string", raw(PEFT_CONFIG, b'"LORA"'), LoadError, [PEFT_CONFIG, "JSON string"]),
    ("config-not-json", raw(PEFT_CONFIG, b"{not json"), LoadError, [PEFT_CONFIG, "not valid JSON"]),
    ("config-empty", raw(PEFT_CONFIG, b""), LoadError, [PEFT_CONFIG, "not valid JSON"]),
    (
        "peft-type-missing",
        edit(PEFT_CONFIG, drops("peft_type")),
        LoadError,
        [PEFT_CONFIG, "peft_type"],
    ),
    (
        "peft-type-number",
        edit(PEFT_CONFIG, sets("peft_type", value=1)),
        LoadError,
        [PEFT_CONFIG, "peft_type = 1"],
    ),
    (
        "peft-type-unknown",
        edit(PEFT_CONFIG, sets("peft_type", value="POLY")),
        LoadError,
        [PEFT_CONFIG, "'POLY'", "LORA", "PROMPT_TUNING", "LOHA"],
    ),
    (
        "r-string",
        edit(PEFT_CONFIG, sets("r", value="two")),
        LoadError,
        [PEFT_CONFIG, "field r = 'two'"],
    ),
    ("r-float", edit(PEFT_CONFIG, sets("r", value=2.0)), LoadError, [PEFT_CONFIG, "field r = 2.0"]),
    (
        "r-bool",
        edit(PEFT_CONFIG, sets("r", value=True)),
        LoadError,
        [PEFT_CONFIG, "field r = True"],
    ),
    ("r-zero", edit(PEFT_CONFIG, sets("r", value=0)), LoadError, [PEFT_CONFIG, "field r = 0"]),
    (
        "r-differs-from-tensors",
        edit(PEFT_CONFIG, sets("r", value=3)),
        LoadError,
        [MODULE, "lora_A.weight", "(2, 32)", "(3, 32)"],
    ),
    (
        "alpha-string",
        edit(PEFT_CONFIG, sets("lora_alpha", value="16")),
        LoadError,
        [PEFT_CONFIG, "field lora_alpha = '16'"],
    ),
    (
        "alpha-bool",
        edit(PEFT_CONFIG, sets("lora_alpha", value=True)),
        LoadError,
        [PEFT_CONFIG, "field lora_alpha = True"],
    ),
    (
        "alpha-nan",
        edit(PEFT_CONFIG, sets("lora_alpha", value=float("nan"))),
        LoadError,
        [PEFT_CONFIG, "field lora_alpha", "finite"],
    ),
    (
        "dropout-string",
        edit(PEFT_CONFIG, sets("lora_dropout", value="0.1")),
        LoadError,
        [PEFT_CONFIG, "field lora_dropout = '0.1'"],
    ),
    (
        "target-modules-number",
        edit(PEFT_CONFIG, sets("target_modules", value=5)),
        LoadError,
        [PEFT_CONFIG, "field target_modules = 5"],
    ),
    (
        "target-modules-of-numbers",
        edit(PEFT_CONFIG, sets("target_modules", value=[1])),
        LoadError,
        [PEFT_CONFIG, "field target_modules[0] = 1"],
    ),
    (
        "rslora-string",
        edit(PEFT_CONFIG, sets("use_rslora", value="yes")),
        LoadError,
        [PEFT_CONFIG, "field use_rslora = 'yes'"],
    ),
    (
        "fan-in-fan-out-number",
        edit(PEFT_CONFIG, sets("fan_in_fan_out", value=0)),
        LoadError,
        [PEFT_CONFIG, "field fan_in_fan_out = 0"],
    ),
    (
        "layers-to-transform-string",
        edit(PEFT_CONFIG, sets("layers_to_transform", value="0")),
        LoadError,
        [PEFT_CONFIG, "field layers_to_transform = '0'"],
    ),
    (
        "init-number",
        edit(PEFT_CONFIG, sets("init_lora_weights", value=5)),
        LoadError,
        [PEFT_CONFIG, "field init_lora_weights = 5"],
    ),
    (
        "auto-mapping-list",
        edit(PEFT_CONFIG, sets("auto_mapping", value=[])),
        LoadError,
        [PEFT_CONFIG, "field auto_mapping = []"],
    ),
    (
        "inference-mode-string",
        edit(PEFT_CONFIG, sets("inference_mode", value="true")),
        LoadError,
        [PEFT_CONFIG, "field inference_mode = 'true'"],
    ),
    (
        "tensor-int64",
        tensors(PEFT_WEIGHTS, cast(PEFT_A, torch.int64), False),
        LoadError,
        [PEFT_WEIGHTS, PEFT_A, "int64"],
    ),
    (
        "tensor-bool",
        tensors(PEFT_WEIGHTS, cast(PEFT_B, torch.bool), False),
        LoadError,
        [PEFT_WEIGHTS, PEFT_B, "bool"],
    ),
    (
        "tensor-missing",
        tensors(PEFT_WEIGHTS, pop(PEFT_B), False),
        LoadError,
        [PEFT_WEIGHTS, MODULE, "lora_B"],
    ),
    (
        "tensor-extra",
        tensors(PEFT_WEIGHTS, put(f"base_model.model.{MODULE}.bias", torch.zeros(32)), False),
        LoadError,
        [PEFT_WEIGHTS, f"base_model.model.{MODULE}.bias"],
    ),
    (
        "tensor-unknown",
        tensors(PEFT_WEIGHTS, put("something_else", torch.zeros(3)), False),
        LoadError,
        [PEFT_WEIGHTS, "'something_else'"],
    ),
    (
        "tensor-wrong-shape",
        tensors(PEFT_WEIGHTS, put(PEFT_A, torch.zeros(2, 31)), False),
        LoadError,
        [MODULE, "lora_A.weight", "(2, 31)", "(2, 32)"],
    ),
    (
        "no-tensors",
        tensors(PEFT_WEIGHTS, lambda t: t.clear(), False),
        LoadError,
        [PEFT_WEIGHTS, "no tensors"],
    ),
    (
        "weights-truncated",
        lambda f: (f / PEFT_WEIGHTS).write_bytes((f / PEFT_WEIGHTS).read_bytes()[:60]),
        LoadError,
        [PEFT_WEIGHTS, "truncated or corrupt"],
    ),
    ("weights-deleted", delete(PEFT_WEIGHTS), LoadError, [PEFT_WEIGHTS, "does not exist"]),
    ("config-deleted", delete(PEFT_CONFIG), LoadError, [PEFT_CONFIG, "does not exist"]),
    (
        "pickle-only",
        both(delete(PEFT_WEIGHTS), raw("adapter_model.bin", b"a pickle")),
        LoadError,
        ["adapter_model.bin", "never unpickles"],
    ),
]


CHECKPOINT: list[Any] = [
    (
        "state-step-missing",
        edit("state.json", drops("step")),
        CheckpointError,
        ["state.json", "field step is missing"],
    ),
    (
        "state-step-string",
        edit("state.json", sets("step", value="three")),
        CheckpointError,
        ["state.json", "field step = 'three'"],
    ),
    (
        "state-step-negative",
        edit("state.json", sets("step", value=-1)),
        CheckpointError,
        ["state.json", "field step = -1"],
    ),
    (
        "state-step-bool",
        edit("state.json", sets("step", value=True)),
        CheckpointError,
        ["state.json", "field step = True"],
    ),
    (
        "state-step-float",
        edit("state.json", sets("step", value=2.0)),
        CheckpointError,
        ["state.json", "field step = 2.0"],
    ),
    (
        "state-list",
        edit("state.json", lambda d: [d]),
        CheckpointError,
        ["state.json", "top level is a JSON array"],
    ),
    (
        "state-unknown-field",
        edit("state.json", sets("colour", value=1)),
        CheckpointError,
        ["state.json", "field colour", "unknown field"],
    ),
    (
        "state-not-json",
        raw("state.json", b"{not json"),
        CheckpointError,
        ["state.json", "not valid JSON"],
    ),
    ("state-deleted", delete("state.json"), CheckpointError, ["state.json", "does not exist"]),
    (
        "state-newer-version",
        edit("state.json", sets("format_version", value=99)),
        CheckpointError,
        ["state.json", "format_version = 99"],
    ),
    (
        "state-version-string",
        edit("state.json", sets("format_version", value="1")),
        CheckpointError,
        ["state.json", "format_version = '1'"],
    ),
    (
        "state-format-other",
        edit("state.json", sets("format", value="other")),
        CheckpointError,
        ["state.json", "format = 'other'"],
    ),
    (
        "state-dataset-len-string",
        edit("state.json", sets("dataset_len", value="16")),
        CheckpointError,
        ["state.json", "field dataset_len = '16'"],
    ),
    (
        "state-trainable-keys-number",
        edit("state.json", sets("trainable_keys", value=5)),
        CheckpointError,
        ["state.json", "field trainable_keys = 5"],
    ),
    (
        "state-rng-missing",
        edit("state.json", drops("rng")),
        CheckpointError,
        ["state.json", "field rng is missing"],
    ),
    (
        "state-rng-python-short",
        edit("state.json", sets("rng", "python", value=[3])),
        CheckpointError,
        ["state.json", "field rng.python"],
    ),
    (
        "state-rng-numpy-wrong",
        edit("state.json", sets("rng", "numpy", 0, value=5)),
        CheckpointError,
        ["state.json", "field rng.numpy"],
    ),
    (
        "config-list",
        edit("config.json", lambda d: [d]),
        CheckpointError,
        ["config.json", "top level is a JSON array"],
    ),
    (
        "config-unknown-field",
        edit("config.json", sets("colour", value=1)),
        CheckpointError,
        ["config.json", "field colour", "unknown field"],
    ),
    (
        "config-lr-string",
        edit("config.json", sets("lr", value="fast")),
        CheckpointError,
        ["config.json", "field lr = 'fast'"],
    ),
    (
        "config-steps-string",
        edit("config.json", sets("steps", value="2")),
        CheckpointError,
        ["config.json", "field steps = '2'"],
    ),
    (
        "config-not-json",
        raw("config.json", b"[1,"),
        CheckpointError,
        ["config.json", "not valid JSON"],
    ),
    (
        "optimizer-list",
        edit("optimizer.json", lambda d: [d]),
        CheckpointError,
        ["optimizer.json", "top level is a JSON array"],
    ),
    (
        "optimizer-type-missing",
        edit("optimizer.json", drops("type")),
        CheckpointError,
        ["optimizer.json", "field type is missing"],
    ),
    (
        "optimizer-groups-string",
        edit("optimizer.json", sets("param_groups", value="all")),
        CheckpointError,
        ["optimizer.json", "field param_groups = 'all'"],
    ),
    (
        "optimizer-params-string",
        edit("optimizer.json", sets("param_groups", 0, "params", value="all")),
        CheckpointError,
        ["optimizer.json", "field param_groups[0].params = 'all'"],
    ),
    (
        "optimizer-scalars-key",
        edit("optimizer.json", sets("scalars", value={"x": {}})),
        CheckpointError,
        ["optimizer.json", "scalars"],
    ),
    (
        "rng-torch-missing",
        tensors("rng.safetensors", pop("torch/cpu"), False),
        CheckpointError,
        ["rng.safetensors", "'torch/cpu'"],
    ),
    (
        "rng-numpy-float",
        tensors("rng.safetensors", cast("numpy/keys", torch.float32), False),
        CheckpointError,
        ["rng.safetensors", "'numpy/keys'", "float32"],
    ),
    (
        "rng-unknown-tensor",
        tensors("rng.safetensors", put("extra", torch.zeros(1)), False),
        CheckpointError,
        ["rng.safetensors", "'extra'"],
    ),
    (
        "optimizer-tensor-key",
        tensors("optimizer.safetensors", put("junk", torch.zeros(1)), False),
        CheckpointError,
        ["optimizer.safetensors", "'junk'"],
    ),
    (
        "trainable-unreadable",
        raw("trainable.safetensors", b"\x00junk"),
        CheckpointError,
        ["trainable.safetensors", "unreadable"],
    ),
    (
        "trainable-int-for-float",
        tensors("trainable.safetensors", cast("head.bias", torch.int64), False),
        CheckpointError,
        ["checkpoint", "head.bias", "torch.int64"],
    ),
    (
        "trainable-missing",
        tensors("trainable.safetensors", pop("head.bias"), False),
        CheckpointError,
        ["checkpoint", "head.bias"],
    ),
    (
        "optimizer-state-incomplete",
        tensors("optimizer.safetensors", pop("state/0/step"), False),
        CheckpointError,
        ["optimizer.safetensors", "incomplete", "exp_avg"],
    ),
    (
        "rng-torch-wrong-size",
        tensors("rng.safetensors", put("torch/cpu", torch.zeros(3, dtype=torch.uint8)), False),
        CheckpointError,
        ["rng.safetensors", "'torch/cpu'", "(3,)"],
    ),
    # caught only while the optimizer state is loaded, after the checkpoint was read: the
    # model's weights must not have been replaced yet
    (
        "optimizer-moment-wrong-shape",
        tensors("optimizer.safetensors", put("state/0/exp_avg", torch.zeros(3, 3)), False),
        CheckpointError,
        ["state/0/exp_avg", "(3, 3)"],
    ),
    (
        "optimizer-moment-integer",
        tensors("optimizer.safetensors", cast("state/0/exp_avg", torch.int64), False),
        CheckpointError,
        ["state/0/exp_avg", "torch.int64"],
    ),
    (
        "optimizer-other-type",
        edit("optimizer.json", sets("type", value="SGD")),
        CheckpointError,
        ["SGD", "same optimizer"],
    ),
    (
        "state-rng-python-negative",
        edit("state.json", lambda d: d["rng"]["python"][1].__setitem__(0, -1)),
        CheckpointError,
        ["state.json", "field rng.python"],
    ),
]
