"""The save format as a schema: what ``unipeft_adapters.json`` may hold (format versions 1
and 2) and how the tensors of ``unipeft_adapters.safetensors`` must match it.

Also the message for any JSON file that breaks a pydantic schema, shared by the PEFT reader
and the trainer's checkpoints: it names the file, the field (as a JSON path) and what would
be accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch import Tensor

from ..contract.errors import LoadError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNCHECKED = "unchecked"
"""The ``weights_sha256`` value that turns the checksum off (for files edited by hand)."""

_READABLE_TEXT = " and ".join(str(v) for v in READABLE_VERSIONS)

# every dtype a safetensors file can hold, by the name the JSON records
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e5m2 int64 int32 int16 int8 uint8 bool"
)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES.split() if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_key(adapter: str, site_name: str, method_id: str, param: str) -> str:
    return f"{adapter}::{site_name}::{method_id}.{param}"


FUSION_PREFIX = "__fusion__"


def fusion_key(fusion: str, site_name: str, param: str) -> str:
    """The safetensors key of a fusion layer's tensor: ``__fusion__::<fusion name>::<site
    name>::<parameter>`` (four parts; an adapter's keys have three)."""
    return f"{FUSION_PREFIX}::{fusion}::{site_name}::{param}"


# ----------------------------------------------------------------------------- messages

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def json_path(loc: Sequence[str | int]) -> str:
    """``adapters.default.sites["encoder.layer.0:attn.q"].A`` from a location's parts."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(the top level)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _data_loc(raw: Any, loc: Sequence[str | int], missing: bool) -> tuple[str | int, ...]:
    """The parts of a pydantic location that are keys or indices of ``raw`` (a union's
    member names, which pydantic puts in the location too, left out)."""
    out: list[str | int] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            out.append(part)
        elif last and missing:
            out.append(part)
    return tuple(out)


# pydantic's words for a wrong JSON type, in JSON's words (no Python class names)
_PLAIN = {
    "dict_type": "a JSON object is needed",
    "model_type": "a JSON object is needed",
    "model_attributes_type": "a JSON object is needed",
    "list_type": "a JSON array is needed",
    "int_type": "an integer is needed",
    "float_type": "a number is needed",
    "string_type": "a string is needed",
    "bool_type": "true or false is needed",
}


def schema_message(
    file: Path | str,
    raw: Any,
    exc: ValidationError,
    what: str,
    accepted: Mapping[str, str] | None = None,
    limit: int = 3,
) -> str:
    """``file`` breaks the schema of ``what``: each bad field by JSON path, the value found
    and what is accepted there (``accepted`` maps a field's last key to a description)."""
    problems: dict[tuple[str | int, ...], str] = {}
    for err in exc.errors():
        kind = err["type"]
        loc = _data_loc(raw, err["loc"], kind == "missing")
        if loc in problems:
            continue
        path = json_path(loc)
        leaf = next((p for p in reversed(loc) if isinstance(p, str)), "")
        want = (accepted or {}).get(leaf)
        if kind == "missing":
            text = f"field {path} is missing; it is required"
        elif kind == "extra_forbidden":
            text = f"field {path} is not a field of {what} (unknown field)"
        else:
            detail = _PLAIN.get(kind, err["msg"])
            text = f"field {path} = {_short(err.get('input'))} is refused: {detail}"
        if want and kind not in ("extra_forbidden", "literal_error"):
            text += f" (accepted: {want})"
        problems[loc] = text
    lines = list(problems.values())
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{file} is not a valid {what}: " + "; ".join(lines[:limit]) + more


def read_json(path: Path, error: type[Exception] = LoadError) -> Any:
    """The JSON value in ``path``; ``error`` naming the file if it is missing or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read as UTF-8 text ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def need_object(path: Path, value: Any, what: str, error: type[Exception] = LoadError) -> None:
    if not isinstance(value, dict):
        raise error(
            f"{path} is not a valid {what}: its top level is a JSON {_json_type(value)}; a "
            "JSON object ({...}) is accepted"
        )


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- the schema

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)
_Size = Annotated[StrictInt, Field(ge=0)]
_Name = Annotated[StrictStr, Field(min_length=1)]
_Checksum = Annotated[StrictStr, Field(pattern=rf"^([0-9a-f]{{64}}|{UNCHECKED})$")]


class SavedTensor(BaseModel):
    """One tensor of the safetensors file: its shape and dtype (version 2)."""

    model_config = _STRICT
    shape: list[_Size]
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]


class _Adapter(BaseModel):
    model_config = _STRICT
    method: _Name
    config: dict[StrictStr, Any]

    def described(self, name: str) -> dict[str, tuple[tuple[int, ...], str | None, str]]:
        """``{tensor key: (shape, dtype or None, JSON path)}`` of every tensor described."""
        out = {}
        for site, params in self.sites.items():  # type: ignore[attr-defined]
            for pname, entry in params.items():
                key = tensor_key(name, site, self.method, pname)
                path = json_path(("adapters", name, "sites", site, pname))
                if isinstance(entry, SavedTensor):
                    out[key] = (tuple(entry.shape), entry.dtype, path)
                else:
                    out[key] = (tuple(entry), None, path)
        return out


class AdapterV2(_Adapter):
    method_distribution: StrictStr | None
    targets: list[StrictStr]
    sites: dict[_Name, dict[_Name, SavedTensor]] = Field(min_length=1)


class AdapterV1(_Adapter):
    method_distribution: StrictStr | None = None
    targets: list[StrictStr] = []
    sites: dict[_Name, dict[_Name, list[_Size]]] = Field(min_length=1)


class SavedFusion(BaseModel):
    """One ``Fuse``'s trainable layers: the Fuse (its JSON form) and per site the tensors."""

    model_config = _STRICT
    fuse: dict[StrictStr, Any]
    sites: dict[_Name, dict[_Name, SavedTensor]] = Field(min_length=1)


class SavedV2(BaseModel):
    """``unipeft_adapters.json``, format version 2 (what this unipeft writes). The two
    optional fields ``composition`` (the active composition's JSON form, when
    ``set_active`` was given one) and ``fusions`` (``Fuse`` layers) are written only when
    there is something to record, so other files are exactly as before them."""

    model_config = _STRICT
    format: Literal["unipeft"]
    format_version: Literal[2]
    unipeft_version: StrictStr
    backbone: StrictStr
    structure_map: StrictStr | None
    active: list[StrictStr]
    weights_sha256: _Checksum
    adapters: dict[StrictStr, AdapterV2] = Field(min_length=1)
    composition: dict[StrictStr, Any] | None = None
    fusions: dict[_Name, SavedFusion] = Field(default_factory=dict)


class SavedV1(BaseModel):
    """``unipeft_adapters.json``, format version 1: per tensor a shape, no dtype."""

    model_config = _STRICT
    format: Literal["unipeft"]
    format_version: Literal[1]
    unipeft_version: StrictStr | None = None
    backbone: StrictStr | None = None
    structure_map: StrictStr | None = None
    active: list[StrictStr] = []
    weights_sha256: _Checksum
    adapters: dict[StrictStr, AdapterV1] = Field(min_length=1)


Saved = SavedV1 | SavedV2

_ACCEPTED = {
    "format": '"unipeft"',
    "format_version": f"an integer, one of {_READABLE_TEXT}",
    "weights_sha256": f'64 lowercase hex digits, or "{UNCHECKED}" to skip the check',
    "shape": "a list of integers >= 0",
    "dtype": ", ".join(DTYPES),
    "targets": "a list of strings",
    "active": "a list of adapter names",
    "method": "a method id (a non-empty string)",
    "sites": "an object: site name -> {parameter: {shape, dtype}}",
    "config": "an object: the method's configuration",
    "adapters": "an object: adapter name -> adapter",
    "composition": "an object: op, children and the operator's settings",
    "fusions": "an object: fusion name -> {fuse, sites}",
    "fuse": "an object: the Fuse's JSON form",
}


def parse_saved(path: Path, raw: Any) -> Saved:
    """Validate the parsed JSON of ``path`` against the schema of its format version."""
    need_object(path, raw, "unipeft adapter config")
    if raw.get("format") != "unipeft":
        raise LoadError(
            f"{path} is not a unipeft adapter config: field format is "
            f'{_short(raw.get("format", "(missing)"))}, and a unipeft save has "unipeft"'
        )
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise LoadError(
            f"{path}: field format_version = {_short(version)} is refused: it must be an "
            f"integer; this unipeft reads format versions {_READABLE_TEXT}"
        )
    if version not in READABLE_VERSIONS:
        newer = "upgrade unipeft to read it" if version > FORMAT_VERSION else "save it again"
        raise LoadError(
            f"{path}: field format_version = {version}; this unipeft reads format versions "
            f"{_READABLE_TEXT} only: {newer}"
        )
    model: type[BaseModel] = SavedV2 if version == 2 else SavedV1
    try:
        doc = model.model_validate(raw)
    except ValidationError as exc:
        what = f"unipeft adapter config (format version {version})"
        raise LoadError(schema_message(path, raw, exc, what, _ACCEPTED)) from None
    assert isinstance(doc, SavedV1 | SavedV2)
    return doc


def check_tensors(doc: Saved, tensors: Mapping[str, Tensor], weights: Path, config: Path) -> None:
    """Every tensor of ``weights`` is one ``config`` describes, with its shape (and, from
    version 2, its dtype) exactly: nothing more, nothing less, nothing converted."""
    described: dict[str, tuple[tuple[int, ...], str | None]] = {}
    where: dict[str, str] = {}
    for name, adapter in doc.adapters.items():
        for key, entry in adapter.described(name).items():
            described[key] = entry[:2]
            where[key] = entry[2]
    for fname, fusion in getattr(doc, "fusions", {}).items():
        for site, params in fusion.sites.items():
            for pname, saved in params.items():
                key = fusion_key(fname, site, pname)
                described[key] = (tuple(saved.shape), saved.dtype)
                where[key] = json_path(("fusions", fname, "sites", site, pname))
    extra = sorted(set(tensors) - set(described))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise LoadError(
            f"{weights} holds tensor {extra[0]!r}{more}, which {config} does not describe; "
            "the file holds exactly the tensors of its config. Save the adapters again"
        )
    missing = sorted(set(described) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(
            f"{weights} lacks tensor {missing[0]!r}{more}, which {config} describes at "
            f"{where[missing[0]]}; the file is incomplete. Save the adapters again"
        )
    for key, (shape, dtype) in described.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise LoadError(
                f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)}, but {config} "
                f"describes shape {shape}; the two files do not belong together"
            )
        if dtype is not None and dtype_name(tensor.dtype) != dtype:
            raise LoadError(
                f"{weights}: tensor {key!r} is {dtype_name(tensor.dtype)}, but {config} "
                f"describes {dtype}: a file's tensors have exactly the dtypes its config "
                "records (nothing is cast while reading). Save the adapters again"
            )
