"""The built-in :class:`~unipeft.features.interop.codec.PeftCodec` of each method PEFT also
has, one module per method (or per group of close methods). Each module defines
``CODECS``, a tuple of codecs; this package collects them."""

from __future__ import annotations

import importlib
import pkgutil

from ..codec import PeftCodec

CODECS: list[PeftCodec] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        CODECS.extend(getattr(_module, "CODECS", ()))
