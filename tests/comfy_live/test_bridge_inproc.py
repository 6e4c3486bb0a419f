"""The bridge against real ComfyUI modules, in this process (no server): sigmas from ComfyUI's own KSampler on a
real Wan model, LATENT scaling, noise, the unload hook, interrupt mapping, and validation before any worker starts."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from comfy_harness import COMFY, ROOT, SKIP_REASON, tiny_config

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]

PKG = "dualparal_pack_under_test"
# Wan21 latent format (comfy/latent_formats.py), written out so the test does not trust the code it checks.
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@pytest.fixture(scope="module")
def pack():
    """The pack imported the way ComfyUI imports it (a path-like module name), with ComfyUI's modules first."""
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    from comfy.cli_args import args

    args.cpu = True
    spec = importlib.util.spec_from_file_location(PKG, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = mod
    spec.loader.exec_module(mod)
    ns = type("Pack", (), {})()
    for name in ("bridge", "types", "sampler", "loader", "extension"):
        setattr(ns, name, importlib.import_module(f"{PKG}.nodes.{name}"))
    return ns


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    from dualparal_core.checkpoint import random_state_dict, save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny_wan.safetensors"
    save_checkpoint(random_state_dict(tiny_config(), seed=0), path, "comfy")
    return path


@pytest.fixture(scope="module")
def wan_model(pack, wan_file):
    """The tiny model loaded by ComfyUI itself (what UNETLoader returns)."""
    import gc

    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(wan_file))
    yield model
    del model
    gc.collect()  # before interpreter exit, where ModelPatcher.__del__ would find its modules gone


def test_core_is_a_top_level_package(pack):
    import dualparal_core

    assert dualparal_core.__name__ == "dualparal_core"
    assert dualparal_core.__file__.startswith(str(ROOT))
    assert type(pack.types.DualParalModel).__module__ != "dualparal_core"  # the node layer lives in the pack
    from dualparal_core.config import PoolSpec

    assert PoolSpec.__module__ == "dualparal_core.config"


@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta", "normal", "sgm_uniform"])
@pytest.mark.parametrize("shift,denoise,steps", [(8.0, 1.0, 30), (3.0, 0.6, 7), (8.0, 1.0, 1), (5.0, 0.3, 4)])
def test_sigmas_match_ksampler_on_a_real_wan_model(pack, wan_model, sampler, scheduler, shift, denoise, steps):
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    model = wan_model
    patched = ModelSamplingSD3().patch(model, shift)[0]
    want = comfy.samplers.KSampler(patched, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler,
                                   denoise=denoise).sigmas
    got = pack.bridge.compute_sigmas(steps, sampler, scheduler, shift, denoise)
    assert torch.equal(got, want.float())
    if shift == 8.0:  # without ModelSamplingSD3 a Wan T2V model samples with shift 8 (supported_models.py)
        plain = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler,
                                        denoise=denoise).sigmas
        assert torch.equal(got, plain.float())


def test_latent_scaling_is_the_wan21_formula(pack):
    t, fmt = pack.types, pack.bridge.latent_format()
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    raw = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 + 0.3
    norm = t.to_model_space(raw, fmt)
    torch.testing.assert_close(norm, (raw - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.from_model_space(norm, fmt), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.from_model_space(torch.zeros_like(raw), fmt), mean.expand_as(raw))
    assert t.to_model_space(torch.zeros(1, 16, 2, 4, 4), fmt) is None  # ComfyUI does not shift an empty latent


def test_fix_latent_and_noise_as_ksampler(pack):
    import comfy.sample

    from dualparal_core.noise import independent_noise

    four_d = torch.zeros(1, 16, 4, 6)
    assert tuple(pack.bridge.fix_latent(four_d).shape) == (1, 16, 1, 4, 6)
    lat = torch.zeros(2, 16, 3, 4, 4)
    assert torch.equal(independent_noise(lat.shape, 1234), comfy.sample.prepare_noise(lat, 1234))
    assert torch.equal(pack.bridge.prepare_noise(lat, 7, [3, 1]), comfy.sample.prepare_noise(lat, 7, [3, 1]))


class FakePool:
    def __init__(self, spec, **kw):
        self.spec, self.alive, self.closed, self.jobs = spec, True, 0, []

    def close(self):
        self.alive = False
        self.closed += 1

    def generate(self, job, on_progress=None, should_cancel=None):
        self.jobs.append(job)
        for i in range(job.num_block_steps):
            on_progress(i + 1, job.num_block_steps, None)
            if should_cancel():
                from dualparal_core.pool import PoolCancelled

                raise PoolCancelled("cancelled")
        return torch.zeros(job.shape) if job.latent is None else job.latent.clone()


@pytest.fixture
def fake_registry(pack, monkeypatch):
    reg = pack.bridge.REGISTRY
    monkeypatch.setattr(reg, "_starter", FakePool)
    monkeypatch.setattr(reg, "_before_start", None)
    yield reg
    reg.close_all("test over")


def _handle(pack, wan_file, keep_alive=True):
    from dualparal_core.config import ModelSource, PoolSpec

    spec = PoolSpec(source=ModelSource(path=str(wan_file)), devices=("cpu", "cpu"), dtype="fp32")
    return pack.types.DualParalModel(spec=spec, config=tiny_config(), keep_alive=keep_alive, key=("k", keep_alive))


def _cond(seed=0, width=4096, **extra):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 16, width, generator=g), {"pooled_output": None, **extra}]]


def _sample(pack, handle, latent, **kw):
    args = dict(model=handle, positive=_cond(1), negative=_cond(2), latent_image=latent, seed=3, steps=2, cfg=5.0,
                sampler_name="euler", scheduler="simple", shift=8.0, denoise=1.0, num_per_block=2, num_cat=1,
                noise_mode="coordinated")
    args.update(kw)
    return pack.sampler.DualParalSampler.execute(**args)


def test_unload_all_models_closes_the_workers(pack, wan_file, fake_registry):
    import comfy.model_management as mm

    pool = pack.bridge.acquire(_handle(pack, wan_file))
    assert pack.bridge.acquire(_handle(pack, wan_file)) is pool  # same key: reused
    mm.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert pool.closed == 1 and len(fake_registry) == 0


def test_sampler_roundtrip_keep_alive_and_progress(pack, wan_file, fake_registry):
    raw = torch.randn(1, 16, 3, 4, 4)
    out = _sample(pack, _handle(pack, wan_file, keep_alive=False), {"samples": raw, "batch_index": [0]},
                  noise_mode="independent")
    lat = out.args[0] if hasattr(out, "args") else out[0]
    torch.testing.assert_close(lat["samples"], raw, rtol=1e-5, atol=1e-5)  # fake pool returns its input
    assert lat["batch_index"] == [0]
    assert len(fake_registry) == 0  # keep_alive off: released after the sampler


def test_interrupt_maps_to_comfy_exception(pack, wan_file, fake_registry):
    import comfy.model_management as mm

    calls = []

    def cancel_after_first(*a):
        calls.append(a)
        mm.interrupt_current_processing(True)

    pool = pack.bridge.acquire(_handle(pack, wan_file))
    pool.generate = lambda job, on_progress, should_cancel: FakePool.generate(
        pool, job, lambda *a: (cancel_after_first(*a), on_progress(*a)), should_cancel)
    with pytest.raises(mm.InterruptProcessingException):
        _sample(pack, _handle(pack, wan_file), {"samples": torch.zeros(1, 16, 3, 4, 4)})
    assert not mm.processing_interrupted()  # the flag was consumed, as ComfyUI's own nodes do
    assert len(calls) == 1 and pool.alive


@pytest.mark.parametrize("case,needle", [
    ("mask", "noise_mask"), ("channels", "48 channels"), ("odd", "multiples of 16"),
    ("width", "negative"), ("area", "area"), ("two", "2 conditionings"),
    ("numcat", "num_cat"), ("sigmas", "sigmas"), ("range", "timestep range"),
])
def test_validation_happens_before_any_worker_starts(pack, wan_file, monkeypatch, case, needle):
    def no_start(*a, **k):
        raise AssertionError("workers were started for an invalid input")

    monkeypatch.setattr(pack.bridge.REGISTRY, "_starter", no_start)
    lat = {"samples": torch.zeros(1, 16, 3, 4, 4)}
    kw = {}
    if case == "mask":
        lat["noise_mask"] = torch.ones(1, 1, 4, 4)
    elif case == "channels":
        lat = {"samples": torch.zeros(1, 48, 3, 4, 4) + 1}
    elif case == "odd":
        lat = {"samples": torch.zeros(1, 16, 3, 5, 4)}
    elif case == "width":
        kw["negative"] = _cond(2, width=768)
    elif case == "area":
        kw["positive"] = _cond(1, area=(8, 8, 0, 0))
    elif case == "two":
        kw["positive"] = _cond(1) + _cond(2)
    elif case == "numcat":
        kw.update(num_per_block=2, num_cat=3)
    elif case == "sigmas":
        kw["sigmas"] = torch.ones(2, 2)
    elif case == "range":
        kw["positive"] = _cond(1, start_percent=0.0, end_percent=0.5)
    with pytest.raises(ValueError, match=needle):
        _sample(pack, _handle(pack, wan_file), lat, **kw)
