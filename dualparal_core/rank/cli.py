"""The rank program's command line, and where a rank finds the model files a parent names."""

from __future__ import annotations

import argparse
import os

from ..config import DTYPES


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun ... -m dualparal_core.worker --serve HOST:PORT",
                                description="A DualParal worker group (one rank per GPU) that ComfyUI's DualParal "
                                            "Loader attaches to with devices=tcp://HOST:PORT.")
    p.add_argument("--serve", required=True, metavar="HOST:PORT",
                   help="where rank 0 listens; a bare PORT means 127.0.0.1 (use 0.0.0.0 only on a trusted network)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="folder searched for the model and LoRA files a parent names (repeatable)")
    p.add_argument("--model", help="load this file at start (a path, or a name under --models-dir)")
    p.add_argument("--random-tiny", type=int, metavar="SEED", help="load a tiny random Wan at start (tests)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the start-up model")
    p.add_argument("--attention", default="auto", help="attention backend of the start-up model (as the Loader's)")
    p.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when there is a GPU, else cpu; or cpu, "
                   "or cuda:N")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a pipeline send/receive may wait")
    p.add_argument("--exit-on-detach", action="store_true",
                   help="end the group when its parent detaches (how a local pool's parent starts it)")
    return p.parse_args(argv)


def find_file(path: str, dirs: list[str], host: str) -> str:
    """``path`` as it is on this host, else its trailing components (longest first) under one of ``dirs``: a path
    of the ComfyUI host (``.../ComfyUI/models/loras/wan/x.safetensors``) finds ``DIR/wan/x.safetensors``."""
    p = os.path.expanduser(str(path))
    if os.path.isfile(p):
        return os.path.realpath(p)
    parts = [x for x in p.replace("\\", "/").split("/") if x not in ("", ".", "..")]
    for d in dirs:
        for i in range(max(0, len(parts) - 4), len(parts)):
            cand = os.path.join(os.path.expanduser(d), *parts[i:])
            if os.path.isfile(cand):
                return os.path.realpath(cand)
    raise FileNotFoundError(f"{path!r} is not on host {host} (searched {dirs or 'no --models-dir'}): copy the file "
                            f"there, or start the group with --models-dir pointing at the folder that holds it.")
