"""Stand-ins for ComfyUI's modules (comfy*, comfy_api, folder_paths, latent_preview), enough for the pack's node
modules to import without ComfyUI: every attribute is a permissive stub. Only for import-hygiene checks; the real
contracts are tested against ComfyUI in tests/comfy_live."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

TOP = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "latent_preview")


class Stub:
    """Any attribute, call, iteration or subclassing of it works and gives another stub (or nothing)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        return Stub(f"{self._name}()")

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return (object,)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in TOP:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def stub_attr(attr: str, prefix: str = spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Stub(f"{prefix}.{attr}")

        module.__getattr__ = stub_attr
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Serve the stand-ins for every later import of ComfyUI's module names in this interpreter."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
