"""unipeft's built-in methods, one folder per family of the PEFT taxonomy.

Each method is a module (or a folder) holding its config, its delta module and its
:class:`~unipeft.Method` record, written with public names only, exactly as a plugin would
write it. ``unipeft.methods.lora`` and the other pre-0.2 paths stay importable.
"""

from __future__ import annotations

import sys

from . import additive, hybrid, moe, reparameterized, selective

BUILTIN_METHODS = (
    *additive.METHODS,
    *selective.METHODS,
    *reparameterized.METHODS,
    *hybrid.METHODS,
    *moe.METHODS,
)

for _family in (additive, selective, reparameterized, hybrid, moe):
    for _name in _family.__dict__:
        _module = getattr(_family, _name)
        if getattr(_module, "METHOD", None) is not None and hasattr(_module, "__file__"):
            sys.modules.setdefault(f"{__name__}.{_name}", _module)  # unipeft.methods.lora
            globals().setdefault(_name, _module)
del _family, _name, _module
