"""PEP 562 lazy attributes for a package ``__init__``: a public name is imported on first use.

:func:`lazy_attributes` makes a package's module ``__getattr__`` and ``__dir__`` from a table
``name -> submodule``. The first lookup of a name imports its submodule and stores the
value in the package's globals, so later lookups never reach ``__getattr__``. Importing
this module imports nothing but :mod:`importlib`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    namespace: MutableMapping[str, Any], exports: Mapping[str, str], submodules: frozenset[str] = frozenset()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose globals are ``namespace``.

    ``exports`` maps a public name to the submodule (relative to the package) that defines
    it; ``submodules`` are submodule names that resolve as attributes (``package.jobs``
    after a bare ``import package``). Anything else is an AttributeError naming it.
    """
    package = namespace["__name__"]

    def get_attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            if name in submodules:
                return importlib.import_module(f"{package}.{name}")  # the import binds it in the package too
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later lookups find it without calling __getattr__
        return value

    def list_names() -> list[str]:
        return sorted({*namespace, *exports, *submodules})

    return get_attribute, list_names
