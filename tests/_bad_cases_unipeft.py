"""The bad-file cases of a unipeft save: its JSON config, then its safetensors file. Each case:
an id, a mutation, the error the load must raise and fragments its message must contain."""

from __future__ import annotations

from typing import Any

import torch
from _bad_files import (
    CONFIG,
    KEY,
    SITE,
    SITE_PATH,
    WEIGHTS,
    both,
    cast,
    delete,
    drops,
    edit,
    pop,
    put,
    raw,
    rename,
    sets,
    tensors,
    to_v1,
)

from unipeft import LoadError, PluginError

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
