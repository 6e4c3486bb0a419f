"""Import ComfyUI's own modules from COMFYUI_PATH for reference comparisons, or skip saying why."""

from __future__ import annotations

import importlib
import os
import sys

import pytest


def import_comfy(*modules: str, why: str) -> list:
    """Import ``modules`` (e.g. "comfy.sample") from the ComfyUI tree at COMFYUI_PATH; skip when it is unset or
    does not import on this interpreter. ``why`` says what the comparison needs ComfyUI for."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(f"COMFYUI_PATH is not set: {why} needs a ComfyUI source tree and an interpreter with its "
                    f"requirements (run this file under ComfyUI's venv)")
    path = os.path.abspath(os.path.expanduser(path))
    if path not in sys.path:
        sys.path.append(path)  # appended, so that ComfyUI's top-level nodes.py/utils do not shadow ours
    try:
        import comfy.cli_args

        if "comfy.model_management" not in sys.modules:
            # Why: comfy.model_management probes the GPU at import; a CPU-only torch raises there without --cpu.
            comfy.cli_args.args.cpu = True
        mods = [importlib.import_module(m) for m in modules]
    except ModuleNotFoundError as e:
        pytest.skip(f"ComfyUI at {path} does not import on this interpreter ({e}); use ComfyUI's venv")
    assert os.path.abspath(comfy.__file__ if comfy.__file__ else comfy.__path__[0]).startswith(path)
    return mods
