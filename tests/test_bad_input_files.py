"""Bad files: a unipeft save, a PEFT folder or a trainer checkpoint, mutated one way each.

Every case asserts the error type, that the message names the culprit (the file, and the
JSON path of the field or the name of the tensor), that the model is exactly as it was and
that the folder's files are byte-identical: a refused load changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _state import files, fingerprint
from safetensors.torch import load_file, save_file
from torch import nn

import unipeft
from unipeft import LoadError, PluginError
from unipeft.features.interop import peft as interop
from unipeft.testing.backbones import BACKBONES
from unipeft.training import CheckpointError, Trainer, TrainerConfig
from unipeft.training.task import TextClassifier, classification_loss

CONFIG, WEIGHTS = "unipeft_adapters.json", "unipeft_adapters.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SITE = "encoder.layer.0:attn.q"
SITE_PATH = f'adapters.default.sites["{SITE}"]'
KEY = f"default::{SITE}::lora.A"
MODULE = "encoder.layer.0.attention.self.query"
PEFT_A = f"base_model.model.{MODULE}.lora_A.weight"
PEFT_B = f"base_model.model.{MODULE}.lora_B.weight"

Mutation = Callable[[Path], None]


# ----------------------------------------------------------------------------- editing files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit(name: str, change: Callable[[Any], Any]) -> Mutation:
    """Replace the JSON of ``name`` by ``change(doc)`` (or the doc ``change`` edited)."""

    def mutate(folder: Path) -> None:
        path = folder / name
        doc = json.loads(path.read_text())
        result = change(doc)
        path.write_text(json.dumps(doc if result is None else result))

    return mutate


def raw(name: str, data: bytes) -> Mutation:
    return lambda folder: (folder / name).write_bytes(data)


def delete(name: str) -> Mutation:
    return lambda folder: (folder / name).unlink()


def tensors(name: str, change: Callable[[dict[str, torch.Tensor]], None], reseal: bool) -> Mutation:
    """Rewrite the safetensors file ``name``; ``reseal``: record the new file's checksum in
    the unipeft config, so that only the tensor checks can catch the change."""

    def mutate(folder: Path) -> None:
        found = load_file(str(folder / name))
        change(found)
        save_file(found, str(folder / name))
        if reseal:
            edit(CONFIG, lambda d: d.update(weights_sha256=_sha(folder / name)))(folder)

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(folder: Path) -> None:
        for m in mutations:
            m(folder)

    return mutate


def sets(*path: Any, value: Any) -> Callable[[Any], None]:
    """A change that sets ``doc[path[0]]...[path[-1]] = value``."""

    def change(doc: Any) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


def drops(*path: Any) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return change


def put(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def cast(key: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, t[key].to(dtype))


def pop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        del t[key]

    return change


def rename(adapter: str) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        doc["adapters"][adapter] = doc["adapters"].pop("default")
        doc["active"] = [adapter]

    return change


def to_v1(doc: Any) -> None:
    """The same save, as format version 1 wrote it (per tensor a shape, no dtype)."""
    doc["format_version"] = 1
    for adapter in doc["adapters"].values():
        for site, params in adapter["sites"].items():
            adapter["sites"][site] = {p: e["shape"] for p, e in params.items()}


# ----------------------------------------------------------------------------- the cases

A = ("adapters", "default")
S = (*A, "sites", SITE)

UNIPEFT: list[Any] = [
    # the JSON's shape
    (
        "top-level-list",
        edit(CONFIG, lambda d: [d]),
        LoadError,
        [CONFIG, "top level is a JSON array"],
    ),
    ("top-level-string", raw(CONFIG, b'"unipeft"'), LoadError, [CONFIG, "JSON string"]),
    ("not-json", raw(CONFIG, b"{not json"), LoadError, [CONFIG, "not valid JSON"]),
    ("empty-json-file", raw(CONFIG, b""), LoadError, [CONFIG, "not valid JSON"]),
    ("not-utf8", raw(CONFIG, b"\xff\xfe{}"), LoadError, [CONFIG, "UTF-8"]),
    ("format-missing", edit(CONFIG, drops("format")), LoadError, [CONFIG, "field format"]),
    (
        "format-other",
        edit(CONFIG, sets("format", value="other")),
        LoadError,
        [CONFIG, "not a unipeft adapter config"],
    ),
    (
        "version-string",
        edit(CONFIG, sets("format_version", value="2")),
        LoadError,
        [CONFIG, "format_version = '2'", "1 and 2"],
    ),
    (
        "version-bool",
        edit(CONFIG, sets("format_version", value=True)),
        LoadError,
        [CONFIG, "format_version = True"],
    ),
    (
        "version-float",
        edit(CONFIG, sets("format_version", value=2.0)),
        LoadError,
        [CONFIG, "format_version = 2.0"],
    ),
    (
        "version-missing",
        edit(CONFIG, drops("format_version")),
        LoadError,
        [CONFIG, "format_version = None"],
    ),
    (
        "version-newer",
        edit(CONFIG, sets("format_version", value=3)),
        LoadError,
        [CONFIG, "format_version = 3", "1 and 2", "upgrade unipeft"],
    ),
    (
        "version-zero",
        edit(CONFIG, sets("format_version", value=0)),
        LoadError,
        [CONFIG, "format_version = 0", "1 and 2"],
    ),
    (
        "unknown-top-field",
        edit(CONFIG, sets("colour", value="red")),
        LoadError,
        [CONFIG, "field colour", "unknown field"],
    ),
    (
        "unipeft-version-int",
        edit(CONFIG, sets("unipeft_version", value=2)),
        LoadError,
        [CONFIG, "field unipeft_version = 2"],
    ),
    (
        "backbone-missing",
        edit(CONFIG, drops("backbone")),
        LoadError,
        [CONFIG, "field backbone is missing"],
    ),
    (
        "structure-map-int",
        edit(CONFIG, sets("structure_map", value=5)),
        LoadError,
        [CONFIG, "field structure_map = 5"],
    ),
    (
        "active-string",
        edit(CONFIG, sets("active", value="default")),
        LoadError,
        [CONFIG, "field active = 'default'"],
    ),
    (
        "active-number",
        edit(CONFIG, sets("active", value=[1])),
        LoadError,
        [CONFIG, "field active[0] = 1"],
    ),
    (
        "active-unknown",
        edit(CONFIG, sets("active", value=["ghost"])),
        LoadError,
        [CONFIG, "active[0] = 'ghost'"],
    ),
    # the checksum
    (
        "checksum-missing",
        edit(CONFIG, drops("weights_sha256")),
        LoadError,
        [CONFIG, "field weights_sha256 is missing", "unchecked"],
    ),
    (
        "checksum-null",
        edit(CONFIG, sets("weights_sha256", value=None)),
        LoadError,
        [CONFIG, "field weights_sha256 = None"],
    ),
    (
        "checksum-short",
        edit(CONFIG, sets("weights_sha256", value="abc")),
        LoadError,
        [CONFIG, "field weights_sha256 = 'abc'"],
    ),
    (
        "checksum-upper",
        edit(CONFIG, lambda d: d.update(weights_sha256=d["weights_sha256"].upper())),
        LoadError,
        [CONFIG, "field weights_sha256"],
    ),
    (
        "checksum-other",
        edit(CONFIG, sets("weights_sha256", value="0" * 64)),
        LoadError,
        [WEIGHTS, CONFIG, "checksum differs"],
    ),
    (
        "checksum-false",
        edit(CONFIG, sets("weights_sha256", value=False)),
        LoadError,
        [CONFIG, "field weights_sha256 = False"],
    ),
    # adapters
    (
        "adapters-list",
        edit(CONFIG, sets("adapters", value=[])),
        LoadError,
        [CONFIG, "field adapters = []"],
    ),
    (
        "adapters-empty",
        edit(CONFIG, sets("adapters", value={})),
        LoadError,
        [CONFIG, "field adapters = {}"],
    ),
    (
        "adapter-string",
        edit(CONFIG, sets(*A, value="lora")),
        LoadError,
        [CONFIG, "field adapters.default = 'lora'"],
    ),
    (
        "adapter-null",
        edit(CONFIG, sets(*A, value=None)),
        LoadError,
        [CONFIG, "field adapters.default = None"],
    ),
    (
        "method-missing",
        edit(CONFIG, drops(*A, "method")),
        LoadError,
        [CONFIG, "field adapters.default.method is missing"],
    ),
    (
        "method-number",
        edit(CONFIG, sets(*A, "method", value=5)),
        LoadError,
        [CONFIG, "field adapters.default.method = 5"],
    ),
    (
        "method-empty",
        edit(CONFIG, sets(*A, "method", value="")),
        LoadError,
        [CONFIG, "field adapters.default.method = ''"],
    ),
    (
        "method-unknown",
        edit(CONFIG, sets(*A, "method", value="nosuch")),
        PluginError,
        [CONFIG, "adapters.default.method", "nosuch"],
    ),
    (
        "targets-number",
        edit(CONFIG, sets(*A, "targets", value=5)),
        LoadError,
        [CONFIG, "field adapters.default.targets = 5"],
    ),
    (
        "targets-of-numbers",
        edit(CONFIG, sets(*A, "targets", value=[1])),
        LoadError,
        [CONFIG, "field adapters.default.targets[0] = 1"],
    ),
    (
        "targets-missing",
        edit(CONFIG, drops(*A, "targets")),
        LoadError,
        [CONFIG, "field adapters.default.targets is missing"],
    ),
    (
        "distribution-number",
        edit(CONFIG, sets(*A, "method_distribution", value=1)),
        LoadError,
        [CONFIG, "adapters.default.method_distribution = 1"],
    ),
    (
        "unknown-adapter-field",
        edit(CONFIG, sets(*A, "colour", value=1)),
        LoadError,
        [CONFIG, "field adapters.default.colour", "unknown field"],
    ),
    (
        "config-list",
        edit(CONFIG, sets(*A, "config", value=[])),
        LoadError,
        [CONFIG, "field adapters.default.config = []"],
    ),
    (
        "config-r-string",
        edit(CONFIG, sets(*A, "config", "r", value="two")),
        LoadError,
        [CONFIG, "adapters.default.config", "'r'", "'two'"],
    ),
    (
        "config-r-float",
        edit(CONFIG, sets(*A, "config", "r", value=2.0)),
        LoadError,
        [CONFIG, "adapters.default.config", "'r'"],
    ),
    (
        "config-r-bool",
        edit(CONFIG, sets(*A, "config", "r", value=True)),
        LoadError,
        [CONFIG, "adapters.default.config", "'r'"],
    ),
    (
        "config-alpha-string",
        edit(CONFIG, sets(*A, "config", "alpha", value="16")),
        LoadError,
        [CONFIG, "adapters.default.config", "'alpha'"],
    ),
    (
        "config-unknown-field",
        edit(CONFIG, sets(*A, "config", "colour", value=1)),
        LoadError,
        [CONFIG, "adapters.default.config", "'colour'"],
    ),
    (
        "config-rank-changed",
        edit(CONFIG, sets(*A, "config", "r", value=3)),
        LoadError,
        ["'default'", SITE, "(2, 32)", "(3, 32)"],
    ),
    # sites and their tensors
    (
        "sites-list",
        edit(CONFIG, sets(*A, "sites", value=[])),
        LoadError,
        [CONFIG, "field adapters.default.sites = []"],
    ),
    (
        "sites-empty",
        edit(CONFIG, sets(*A, "sites", value={})),
        LoadError,
        [CONFIG, "field adapters.default.sites = {}"],
    ),
    (
        "site-string",
        edit(CONFIG, sets(*S, value="A")),
        LoadError,
        [CONFIG, f"field {SITE_PATH} = 'A'"],
    ),
    (
        "tensor-entry-list",
        edit(CONFIG, sets(*S, "A", value=[2, 32])),
        LoadError,
        [CONFIG, f"field {SITE_PATH}.A = [2, 32]"],
    ),
    (
        "shape-string",
        edit(CONFIG, sets(*S, "A", "shape", value="2x32")),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.shape = '2x32'"],
    ),
    (
        "shape-negative",
        edit(CONFIG, sets(*S, "A", "shape", value=[-2, 32])),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.shape[0] = -2"],
    ),
    (
        "shape-float",
        edit(CONFIG, sets(*S, "A", "shape", value=[2.0, 32])),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.shape[0] = 2.0"],
    ),
    (
        "shape-missing",
        edit(CONFIG, drops(*S, "A", "shape")),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.shape is missing"],
    ),
    (
        "dtype-unknown",
        edit(CONFIG, sets(*S, "A", "dtype", value="float31")),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.dtype = 'float31'", "bfloat16"],
    ),
    (
        "dtype-number",
        edit(CONFIG, sets(*S, "A", "dtype", value=32)),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.dtype = 32"],
    ),
    (
        "tensor-entry-unknown-field",
        edit(CONFIG, sets(*S, "A", "scale", value=1)),
        LoadError,
        [CONFIG, f"{SITE_PATH}.A.scale", "unknown field"],
    ),
    (
        "shape-differs-from-file",
        edit(CONFIG, sets(*S, "A", "shape", value=[3, 32])),
        LoadError,
        [WEIGHTS, KEY, "(2, 32)", "(3, 32)"],
    ),
    (
        "dtype-differs-from-file",
        edit(CONFIG, sets(*S, "A", "dtype", value="float16")),
        LoadError,
        [WEIGHTS, KEY, "float32", "float16"],
    ),
    (
        "site-unknown",
        edit(
            CONFIG,
            lambda d: d["adapters"]["default"]["sites"].update(
                {"nowhere:attn.q": d["adapters"]["default"]["sites"].pop(SITE)}
            ),
        ),
        LoadError,
        [CONFIG, "adapters.default.sites", "'nowhere:attn.q'", "does not have"],
    ),
    (
        "described-tensor-dropped",
        edit(CONFIG, drops(*S, "B")),
        LoadError,
        [WEIGHTS, "default::encoder.layer.0:attn.q::lora.B", "does not describe"],
    ),
    # adapter names
    ("name-slash", edit(CONFIG, rename("a/b")), LoadError, [CONFIG, "names an adapter", "'a/b'"]),
    (
        "name-reserved",
        edit(CONFIG, rename("__base__")),
        LoadError,
        [CONFIG, "names an adapter", "__base__"],
    ),
    ("name-empty", edit(CONFIG, rename("")), LoadError, [CONFIG, "names an adapter", "''"]),
    (
        "name-newline",
        edit(CONFIG, rename("x\n")),
        LoadError,
        [CONFIG, "names an adapter", "'x\\n'"],
    ),
    (
        "name-too-long",
        edit(CONFIG, rename("a" * 129)),
        LoadError,
        [CONFIG, "names an adapter", "128"],
    ),
    # format version 1
    (
        "v1-shape-dict",
        edit(CONFIG, lambda d: d.update(format_version=1)),
        LoadError,
        [CONFIG, "format version 1", f"{SITE_PATH}.A"],
    ),
    (
        "v1-checksum-missing",
        edit(CONFIG, lambda d: (to_v1(d), d.pop("weights_sha256")) and None),
        LoadError,
        [CONFIG, "weights_sha256 is missing"],
    ),
    (
        "v1-shape-wrong",
        edit(CONFIG, lambda d: (to_v1(d), sets(*S, "A", value=[4, 32])(d)) and None),
        LoadError,
        [WEIGHTS, KEY, "(4, 32)"],
    ),
]

SAFETENSORS: list[Any] = [
    (
        "int64-for-float",
        tensors(WEIGHTS, cast(KEY, torch.int64), True),
        LoadError,
        [WEIGHTS, KEY, "int64", "float32"],
    ),
    (
        "int64-described-so",
        both(
            tensors(WEIGHTS, cast(KEY, torch.int64), True),
            edit(CONFIG, sets(*S, "A", "dtype", value="int64")),
        ),
        LoadError,
        [WEIGHTS, KEY, "int64", "floating-point"],
    ),
    (
        "int32-for-float",
        tensors(WEIGHTS, cast(KEY, torch.int32), True),
        LoadError,
        [WEIGHTS, KEY, "int32"],
    ),
    (
        "uint8-for-float",
        tensors(WEIGHTS, cast(KEY, torch.uint8), True),
        LoadError,
        [WEIGHTS, KEY, "uint8"],
    ),
    (
        "bool-for-float",
        tensors(WEIGHTS, cast(KEY, torch.bool), True),
        LoadError,
        [WEIGHTS, KEY, "bool"],
    ),
    (
        "float16-for-float32",
        tensors(WEIGHTS, cast(KEY, torch.float16), True),
        LoadError,
        [WEIGHTS, KEY, "float16", "float32"],
    ),
    (
        "bfloat16-for-float32",
        tensors(WEIGHTS, cast(KEY, torch.bfloat16), True),
        LoadError,
        [WEIGHTS, KEY, "bfloat16"],
    ),
    (
        "float64-for-float32",
        tensors(WEIGHTS, cast(KEY, torch.float64), True),
        LoadError,
        [WEIGHTS, KEY, "float64"],
    ),
    (
        "extra-tensor",
        tensors(WEIGHTS, put("default::x::lora.C", torch.zeros(2)), True),
        LoadError,
        [WEIGHTS, "'default::x::lora.C'", "does not describe"],
    ),
    (
        "missing-tensor",
        tensors(WEIGHTS, pop(KEY), True),
        LoadError,
        [WEIGHTS, KEY, "lacks tensor", f"{SITE_PATH}.A"],
    ),
    (
        "wrong-shape",
        tensors(WEIGHTS, put(KEY, torch.zeros(2, 31)), True),
        LoadError,
        [WEIGHTS, KEY, "(2, 31)", "(2, 32)"],
    ),
    (
        "wrong-shape-described-so",
        both(
            tensors(WEIGHTS, put(KEY, torch.zeros(2, 31)), True),
            edit(CONFIG, sets(*S, "A", "shape", value=[2, 31])),
        ),
        LoadError,
        [KEY, "(2, 31)", "(2, 32)"],
    ),
    (
        "scalar-tensor",
        tensors(WEIGHTS, put(KEY, torch.tensor(1.0)), True),
        LoadError,
        [WEIGHTS, KEY, "()"],
    ),
    (
        "transposed",
        tensors(WEIGHTS, lambda t: t.__setitem__(KEY, t[KEY].T.contiguous()), True),
        LoadError,
        [WEIGHTS, KEY, "(32, 2)"],
    ),
    (
        "key-renamed",
        tensors(WEIGHTS, lambda t: t.__setitem__("other::" + KEY[9:], t.pop(KEY)), True),
        LoadError,
        [WEIGHTS, "other::"],
    ),
    (
        "changed-not-resealed",
        tensors(WEIGHTS, put(KEY, torch.ones(2, 32)), False),
        LoadError,
        [WEIGHTS, CONFIG, "checksum differs"],
    ),
    (
        "truncated",
        lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:100]),
        LoadError,
        [WEIGHTS, "checksum differs"],
    ),
    (
        "truncated-unchecked",
        both(
            lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:100]),
            edit(CONFIG, sets("weights_sha256", value="unchecked")),
        ),
        LoadError,
        [WEIGHTS, "truncated"],
    ),
    (
        "garbage-unchecked",
        both(raw(WEIGHTS, b"\x00junk"), edit(CONFIG, sets("weights_sha256", value="unchecked"))),
        LoadError,
        [WEIGHTS, "not a readable safetensors file"],
    ),
    (
        "empty-unchecked",
        both(raw(WEIGHTS, b""), edit(CONFIG, sets("weights_sha256", value="unchecked"))),
        LoadError,
        [WEIGHTS, "not a readable safetensors file"],
    ),
    (
        "int-unchecked",
        both(
            tensors(WEIGHTS, cast(KEY, torch.int64), False),
            edit(CONFIG, sets("weights_sha256", value="unchecked")),
        ),
        LoadError,
        [WEIGHTS, KEY, "int64"],
    ),
    ("weights-deleted", delete(WEIGHTS), LoadError, [WEIGHTS, "does not exist"]),
    ("config-deleted", delete(CONFIG), LoadError, [CONFIG, "does not exist"]),
]

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
