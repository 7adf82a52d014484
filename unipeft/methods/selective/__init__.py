"""Selective methods: chosen existing parameters of the backbone are tuned.

Every module (or folder) of this package that defines ``METHOD`` is one method; ``METHODS``
lists them, bitfit first, then the others by name.
"""

import importlib
import pkgutil

_FIRST = ["bitfit"]
_names = _FIRST + sorted(
    i.name for i in pkgutil.iter_modules(__path__) if i.name not in _FIRST and i.name[0] != "_"
)
_modules = [importlib.import_module(f"{__name__}.{n}") for n in _names]
METHODS = tuple(m.METHOD for m in _modules if getattr(m, "METHOD", None) is not None)
