"""The YAML run configuration of ``unipeft train``, validated with errors that name the line.

The YAML is composed to nodes as well as loaded, so a pydantic error location such as
``("trainer", "lr")`` maps back to the line of that key or value in the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..contract.errors import UnipeftError
from .config import DistributedConfig, TrainerConfig

TEXT_BACKBONES = ("bert", "gpt2", "llama")
MODELS = ("minilm", *(f"tiny:{n}" for n in TEXT_BACKBONES))


class RunConfigError(UnipeftError, ValueError):
    """The run configuration (YAML), its data file or its output folder is invalid."""


_FROZEN = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DataSpec(BaseModel):
    """A text-classification data set: a CSV (with a header) or JSONL file."""

    model_config = _FROZEN

    path: Path = Field(description="CSV or JSONL file; relative paths start at the YAML's folder")
    text_column: str = Field("text", description="the column (or JSON key) holding the text")
    label_column: str = Field("label", description="the column (or JSON key) holding the label")
    eval_path: Path | None = Field(
        None, description="optional held-out file of the same format; accuracy is reported on it"
    )
    max_length: int = Field(128, ge=1, description="texts are truncated to this many tokens")


class RunConfig(BaseModel):
    """Everything ``unipeft train`` needs: a backbone, data, a method, trainer settings."""

    model_config = _FROZEN

    model: str = Field(description=f"the backbone: one of {', '.join(MODELS)}")
    data: DataSpec = Field(description="the training data")
    method: str = Field(description="a unipeft method id (see unipeft.list_methods())")
    config: dict[str, Any] = Field(
        default_factory=dict, description="the method's config fields (fixed when budgeting)"
    )
    budget: str | float | None = Field(
        None, description="size the method to this fraction of the backbone, e.g. '0.5%'"
    )
    targets: list[str] | None = Field(None, description="target roles; null: method defaults")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="trainer settings")
    output_dir: Path = Field(description="where checkpoints, metrics and the adapter go")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="launched as several processes (torchrun, accelerate launch): engine "
        "(auto, ddp, fsdp2), backend (auto, gloo, nccl), param_dtype, "
        "reshard_after_forward, find_unused_parameters",
    )

    @model_validator(mode="after")
    def _one_distributed_section(self) -> RunConfig:
        if (
            "distributed" in self.model_fields_set
            and "distributed" in self.trainer.model_fields_set
        ):
            raise ValueError(
                "distributed is given twice, at the top level and under trainer; keep the "
                "top-level distributed: section"
            )
        return self

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if value not in MODELS:
            close = difflib.get_close_matches(value, MODELS, n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown model {value!r}.{hint} Choose one of: {', '.join(MODELS)}")
        return value

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: str | float | None) -> str | float | None:
        from ..features.budget import parse_budget

        if value is not None:
            parse_budget(value)  # ConfigError is a ValueError: pydantic reports it
        return value


def line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the YAML node at ``loc``, or of its deepest existing ancestor."""
    node, line = root, 1
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def describe(
    exc: ValidationError, model: type[BaseModel], root: yaml.Node | None, source: str,
    prefix: tuple[Any, ...] = (),
) -> str:  # fmt: skip
    """Every pydantic error in one line, ``file:line: key: problem`` joined by ``; ``; unknown
    keys come with the closest known ones and the list of known keys."""
    parts = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        where = f"{source}:{line_of(root, loc)}"
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(err["loc"])[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            parts.append(f"{where}: unknown key {key!r}.{hint} Known keys: {', '.join(known)}")
        elif err["type"] == "missing":
            parts.append(f"{where}: missing required key {key!r}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            parts.append(f"{where}: {key}: {err['msg']}{shown}")
    return "; ".join(" ".join(p.split()) for p in parts)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        info = model.model_fields.get(str(part))
        sub = getattr(info, "annotation", None) if info is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return sorted(model.model_fields)


def _check_duplicates(node: yaml.Node | None, source: str) -> None:
    """YAML forbids a key twice in a mapping; PyYAML silently keeps the last one."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise RunConfigError(
                    f"{source}:{key.start_mark.line + 1}: a key must be a plain name, not a "
                    f"{'list' if isinstance(key, yaml.SequenceNode) else 'mapping'}"
                )
            if key.value in seen:
                raise RunConfigError(
                    f"{source}:{key.start_mark.line + 1}: key {key.value!r} appears twice in "
                    "the same mapping; keep one"
                )
            seen.add(key.value)
            _check_duplicates(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, source)


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of the file ``path``; :class:`RunConfigError` naming ``what`` (the
    file's role) when it is missing, a folder, unreadable, or not UTF-8 (with its line)."""
    if path.is_dir():
        raise RunConfigError(f"{what} {path} is a folder; give a file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise RunConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RunConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save {what} as UTF-8"
        ) from None


def _yaml_error(source: Path, exc: yaml.YAMLError) -> RunConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(source)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return RunConfigError(f"{where}: not valid YAML: {' '.join(str(detail).split())}")


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run configuration; relative paths are resolved against the YAML's
    folder. Raises :class:`RunConfigError`, one line naming the file, the line and each bad
    key, and what would be accepted."""
    from ..contract.errors import PluginError
    from ..runtime.registry import registry

    source = Path(path)
    text = read_text(source, "the run configuration")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    except ValueError as exc:  # e.g. a date PyYAML reads but cannot build
        raise RunConfigError(f"{source}: not valid YAML: {exc}") from None
    _check_duplicates(root, str(source))
    keys = ", ".join(RunConfig.model_fields)
    if doc is None:
        raise RunConfigError(f"{source}:1: the run configuration is empty; give the keys {keys}")
    if not isinstance(doc, dict):
        raise RunConfigError(
            f"{source}:1: the run configuration must be a mapping with the keys {keys}, "
            f"not a {type(doc).__name__}"
        )
    trainer = doc.get("trainer")
    if "distributed" in doc and isinstance(trainer, dict) and "distributed" in trainer:
        raise RunConfigError(
            f"{source}:{line_of(root, ('trainer', 'distributed'))}: distributed is given twice, "
            "under trainer and at the top level; keep the top-level distributed: section"
        )
    try:
        cfg = RunConfig.model_validate(doc)
    except ValidationError as exc:
        raise RunConfigError(describe(exc, RunConfig, root, str(source))) from None
    try:
        spec = registry().method(cfg.method)
    except PluginError as exc:
        raise RunConfigError(f"{source}:{line_of(root, ('method',))}: {exc}") from None
    try:
        spec.config.model_validate(cfg.config)
    except ValidationError as exc:
        msg = describe(exc, spec.config, root, str(source), ("config",))
        raise RunConfigError(f"{msg} (the config of method {spec.id!r})") from None
    base = source.resolve().parent
    data = cfg.data.model_copy(
        update={
            "path": base / cfg.data.path.expanduser(),
            "eval_path": base / cfg.data.eval_path.expanduser() if cfg.data.eval_path else None,
        }
    )
    return cfg.model_copy(update={"data": data, "output_dir": base / cfg.output_dir.expanduser()})
