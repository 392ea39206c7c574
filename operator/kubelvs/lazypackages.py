"""Import a library's submodules without its package ``__init__`` importing everything else.

``kubernetes/__init__.py`` imports config (and through ``kube_config`` requests, oauthlib,
google-auth and yaml), dynamic, watch, stream, utils, leaderelection and informer;
``pyroute2/__init__.py`` imports every socket class it has (NDB, IPDB, conntrack, ethtool, nl80211,
pydantic...). kubelvs needs a few submodules of each. Measured on the director
(``import kubelvs.director.app``): 839 modules and 59 MB RSS with the eager ``__init__``s, and in
the VM the imports alone took 11-18 s of a director's start under emulation.

``defer(name)`` registers the package in ``sys.modules`` with its ``__path__`` but without running
its ``__init__``, so ``import kubernetes.client`` runs only ``kubernetes/client/__init__.py``. The
first attribute asked of the package itself that is not a submodule (``from pyroute2 import NetNS``,
``kubernetes.config.load_kube_config``) runs the real ``__init__`` on that same module object, so
code that wants the whole package still gets it, only later. A package imported before ``defer``
is left as it is. A name that is both a submodule and something else the ``__init__`` exports
resolves to the submodule while the package is deferred: of the packages kubelvs defers, only
``kubernetes.utils`` has one (``create_from_yaml``, the function and its module), and nothing in
kubelvs uses it; who wants the function imports it from its module.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def defer(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed, or not a package: nothing to defer
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def load_on_first_use(attribute: str) -> Any:
        # A submodule (`from pyroute2 import config`, as pyroute2's own modules do) is imported
        # alone; anything else is what the package's __init__ defines.
        if importlib.util.find_spec(f"{name}.{attribute}") is not None:
            return importlib.import_module(f"{name}.{attribute}")
        # Remove the hook first: the real __init__ reads its own attributes while it runs.
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        try:
            return module.__dict__[attribute]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

    module.__dict__["__getattr__"] = load_on_first_use
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def is_deferred(module: types.ModuleType) -> bool:
    """True while the package's own ``__init__`` has not run."""
    return "__getattr__" in module.__dict__ and module.__dict__["__getattr__"].__name__ == "load_on_first_use"
