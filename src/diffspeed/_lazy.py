"""Deferred imports, so ``import diffspeed`` and the CLI's cheap paths never load torch or diffusers.

``torch = lazy_import("torch")`` binds a stand-in whose first attribute access imports the real module; until
then ``sys.modules`` has no ``torch``. (``importlib.util.LazyLoader`` would put a placeholder in ``sys.modules``
at once, which makes "has torch been imported?" impossible to answer, so this is a plain proxy.)
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        """Called only for names not yet looked up: each is then kept on the instance, so the hooks that use
        ``torch.cat`` on every denoiser call pay a plain attribute lookup, not this method."""
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        value = getattr(module, attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module is not None else ''}>"


def lazy_import(name: str) -> ModuleType:
    """A stand-in for module ``name`` that imports it on first use (typed as the module for readers)."""
    return _LazyModule(name)  # type: ignore[return-value]
