"""The PEFT codecs: the built-in :class:`~unipeft.features.interop.codec.PeftCodec` of each
method PEFT also has (one module per method; each defines ``CODECS``, a tuple of codecs,
collected here in name order), and the registry the interop looks codecs up in, which a
plugin extends with :func:`register_codec`."""

from __future__ import annotations

import importlib
import pkgutil

from ..codec import PeftCodec

CODECS: list[PeftCodec] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        CODECS.extend(getattr(_module, "CODECS", ()))

_BY_TYPE: dict[str, PeftCodec] = {c.peft_type.upper(): c for c in CODECS}
_BY_METHOD: dict[str, PeftCodec] = {c.method: c for c in CODECS}


def register_codec(codec: PeftCodec) -> None:
    """Make ``codec`` the converter of its PEFT type and of its unipeft method."""
    if not isinstance(codec, PeftCodec):
        raise TypeError(f"register_codec takes a PeftCodec, got {type(codec).__name__}")
    _BY_TYPE[codec.peft_type.upper()] = codec
    _BY_METHOD[codec.method] = codec


def codec_for_type(peft_type: str) -> PeftCodec | None:
    """The codec of PEFT type ``peft_type`` (any case), or None."""
    return _BY_TYPE.get(peft_type.upper())


def codec_for_method(method: str) -> PeftCodec | None:
    """The codec that writes unipeft method ``method`` as a PEFT type, or None."""
    return _BY_METHOD.get(method)


def registered_types() -> list[str]:
    """Every PEFT type a codec converts."""
    return sorted(_BY_TYPE)
