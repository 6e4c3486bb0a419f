"""Inputs that used to get past the up-front checks and cost a healthy pool (or the host's memory): every PoolSpec
field before any pool is stopped, a conditioning whose padded length explodes, a latent larger than the host."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fault_helpers import tiny_job, tiny_spec

from dualparal_core.config import ModelSource, PoolSpec, WanConfig
from dualparal_core.protocol import MAX_CONTEXT_TOKENS, Job
from dualparal_core.runtime import check_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = WanConfig.tiny()


@pytest.mark.parametrize("field,value,needle", [
    ("attention", "flash3", r"attention='flash3' is not supported.*sdpa"),
    ("max_in_flight", 0, r"max_in_flight=0 must be a whole number"),
    ("compile", "yes", r"compile='yes' must be True, False or None"),
    ("dtype", "fp64", r"dtype='fp64' is not supported"),
])
def test_every_pool_spec_field_is_checked_before_any_process(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        PoolSpec(ModelSource(random_config=TINY), devices=("cpu",), **{field: value})
    spec = tiny_spec(1)
    object.__setattr__(spec, field, value)  # as an unpickled spec: __post_init__ never ran
    with pytest.raises(ValueError, match=needle):
        check_spec(spec, {})


def test_the_loaders_registry_checks_the_spec_before_stopping_a_pool():
    """The bridge wires its check into the registry (and reads the timeouts from the environment in one place)."""
    code = (f"import importlib, importlib.util, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            f"import comfy_stand_in; comfy_stand_in.install(); "
            f"s = importlib.util.spec_from_file_location('p', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m = importlib.util.module_from_spec(s); "
            f"sys.modules['p'] = m; s.loader.exec_module(m); b = importlib.import_module('p.nodes.bridge'); "
            f"from fault_helpers import tiny_spec; spec = tiny_spec(1); "
            f"object.__setattr__(spec, 'attention', 'flash3'); closed = []; "
            f"b.REGISTRY._pools[('old',)] = type('P', (), dict(spec=tiny_spec(1), alive=True, "
            f"close=lambda self: closed.append(1)))(); "
            f"\ntry:\n b.REGISTRY.acquire(('new',), spec)\nexcept ValueError as e:\n print('refused:', e)\n"
            f"print('closed', len(closed))\n"
            f"from dualparal_core import pool\npool.WorkerPool.start = classmethod(lambda c, s, t, **k: t)\n"
            f"print('step', b._start_pool(tiny_spec(1)).step)")
    env = {**os.environ, "DUALPARAL_STEP_TIMEOUT": "1234"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "refused: attention='flash3' is not supported" in out.stdout and "closed 0" in out.stdout, out.stdout
    assert "step 1234.0" in out.stdout


def test_a_prompt_over_the_token_cap_is_refused_naming_it_and_lengths_need_not_match():
    job = tiny_job()
    job.cond, job.uncond = torch.zeros(1, 100_000, 64), torch.zeros(1, 77, 64)
    with pytest.raises(ValueError) as e:
        job.validate(TINY)
    for part in ("positive", "100000", str(MAX_CONTEXT_TOKENS), "512"):
        assert part in str(e.value), str(e.value)
    job.cond, job.uncond = torch.zeros(1, 77, 64), torch.zeros(1, MAX_CONTEXT_TOKENS + 1, 64)
    with pytest.raises(ValueError, match=f"negative has {MAX_CONTEXT_TOKENS + 1} tokens"):
        job.validate(TINY)
    job.cond, job.uncond = torch.zeros(1, MAX_CONTEXT_TOKENS + 1, 64), None  # alone, without CFG
    job.sampling = replace(job.sampling, cfg=1.0)
    with pytest.raises(ValueError, match=f"positive has {MAX_CONTEXT_TOKENS + 1} tokens"):
        job.validate(TINY)
    # each prompt keeps its own length (cross-attention runs per batch half): 600 with 512 was refused when both
    # were padded to their lcm (38400 tokens); now each prompt only has to fit the cap
    for a, b in ((512, 512), (1024, 512), (600, 512), (77, 5), (MAX_CONTEXT_TOKENS, 511)):
        job = tiny_job()
        job.cond, job.uncond = torch.zeros(1, a, 64), torch.zeros(1, b, 64)
        job.validate(TINY)


def test_a_latent_larger_than_the_host_is_refused_up_front():
    import psutil

    shape = (1, 16, 10_000, 1000, 1000)
    job = Job(tiny_job().sampling, shape, cond=torch.zeros(1, 5, 64), uncond=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError) as e:
        job.validate(TINY)
    text = str(e.value)
    assert text.startswith("latent_image") and "[1, 16, 10000, 1000, 1000]" in text and "GiB" in text, text
    assert "RAM" in text and "frames" in text
    avail = psutil.virtual_memory().available
    fits = (1, 16, 21, 60, 104)  # 832x480, 81 frames: a few MiB
    assert 16 * 21 * 60 * 104 * 4 * 8 < avail
    Job(tiny_job().sampling, fits, cond=torch.zeros(1, 5, 64), uncond=torch.zeros(1, 3, 64)).validate(TINY)
