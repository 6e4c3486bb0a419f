"""Exact checksums of a rank's compiled elementwise calls and layer inputs: a diagnostic, off unless asked for.

``DUALPARAL_TRACE=DIR`` in a rank's environment (read by :class:`~dualparal_core.engine.RankEngine`) installs it;
after every job the rank writes ``DIR/rank{R}.json``, so the file holds its last job. Each row is one call, in call
order: the block-step (block, step), the layer, the call's number inside the layer (0: the layer's input), the
function, the int64 sum of its output's bits and the same of each tensor input. benchmarks/trace_parity.py compares
the files of runs on 1 and 2 GPUs to find the first call that gives other bits for the same bits in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor | tuple) -> torch.Tensor:
    """int64 sum of a tensor's bit patterns (of each tensor, for a function returning several): equal for equal
    tensors, different for almost any 1-ulp change."""
    if isinstance(t, (tuple, list)):
        return sum((bits(x) for x in t), torch.zeros((), dtype=torch.int64, device=t[0].device))
    return t.view(_INT_OF_SIZE[t.element_size()]).sum(dtype=torch.int64)


def install_trace(engine, out_dir: str) -> None:
    """Wrap ``engine``'s layers, its stages' compiled chains and its ``run_job`` (instance attributes only)."""
    rec: list[tuple] = []
    cur: dict = {"item": None, "layer": None, "n": 0}

    def record(key: str, out: torch.Tensor, ins) -> None:
        if cur["item"] is not None:  # None: before the job's first block-step (pre-warm runs are not traced)
            rec.append((cur["item"], cur["layer"], cur["n"], key, bits(out), [bits(a) for a in ins]))

    for stage in engine.model.stages:
        index = {id(b): int(k) for k, b in stage.blocks.items()}
        for key, fn in list(stage._ew.items()):
            def traced(*args, _fn=fn, _key=key, **kwargs):
                out = _fn(*args, **kwargs)
                cur["n"] += 1
                record(_key, out, [a for a in args if torch.is_tensor(a)])
                return out

            stage._ew[key] = traced

        def layer(blk, h, *args, _inner=stage._layer, _index=index, **kwargs):
            cur["layer"], cur["n"] = _index[id(blk)], 0
            record("in", h, [])
            return _inner(blk, h, *args, **kwargs)

        stage._layer = layer
    inner_layers, inner_run = engine._layers, engine.run_job

    def layers(item, h):
        cur["item"] = (item.block, item.step)
        return inner_layers(item, h)

    def run_job(*args, **kwargs):
        rec.clear()
        cur["item"] = None
        out = inner_run(*args, **kwargs)
        rows = [dict(item=list(i), layer=lay, n=n, fn=k, out=o.item(), ins=[x.item() for x in ins])
                for i, lay, n, k, o, ins in rec]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"rank{engine.rank}.json").write_text(json.dumps(rows))
        rec.clear()
        return out

    engine._layers, engine.run_job = layers, run_job
