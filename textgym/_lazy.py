"""Names imported on first access (PEP 562), so that importing a package stays light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(module_name: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[name]`` (a module path) on first access of
    ``name`` and keeps the value in module ``module_name``, so later accesses are plain lookups.

    Use as ``__getattr__ = lazy_names(__name__, {"Name": "package.module"})``.

    :param module_name: the module the ``__getattr__`` belongs to (its ``__name__``).
    :param names: public name -> the module that defines it.
    :return: the ``__getattr__`` function; it raises ``AttributeError`` for any other name.
    """
    def module_getattr(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(sys.modules[module_name], name, value)
        return value

    return module_getattr
