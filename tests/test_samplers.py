"""Block samplers against independent references (formula, k-diffusion, diffusers) and ComfyUI's own KSAMPLER."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from comfy_import import import_comfy

from dualparal_core.config import SAMPLER_NAMES
from dualparal_core.samplers import BlockSampler, make_sampler

SHAPE = (1, 4, 3, 4, 4)  # [B, C, T, H, W]


class TinyModel:
    """A deterministic nonlinear "denoiser": x0 prediction from (x, sigma [B]), mixing channels and frames."""

    def __init__(self, channels: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = (torch.randn(channels, channels, generator=g) / channels ** 0.5).to(dtype)
        self.b = (0.1 * torch.randn(channels, generator=g)).to(dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1, 1)
        h = torch.einsum("oc,bcthw->bothw", self.w, x) + 0.3 * torch.roll(x, 1, dims=2)
        return torch.tanh(h + self.b.view(1, -1, 1, 1, 1)) * (1 - 0.5 * s) + 0.2 * s * x


def flow_table(steps: int, shift: float = 5.0, stop: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """sigma(t) = shift·t/(1+(shift−1)·t) on an even grid ending at 0; ``stop`` cuts it early (last sigma > 0)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    s = shift * t / (1 + (shift - 1) * t)
    return (s[: stop + 1] if stop is not None else s).to(dtype)


def run_blocks(name: str, sigmas: torch.Tensor, x_init: torch.Tensor, model, start: bool = True) -> torch.Tensor:
    """Our state machine, stepped S times (without ``finish``)."""
    smp = make_sampler(name, sigmas)
    x = smp.start(x_init) if start else x_init
    ones = torch.ones(x.shape[0], dtype=smp.sigmas.dtype)
    for i in range(smp.steps):
        x = smp.step(x, model(x, smp.sigmas[i] * ones))
    assert smp.done and smp.step_index == smp.steps
    return x


def make_x(seed: int = 1, dtype=torch.float64, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


TABLES = [pytest.param(flow_table(n), id=f"S{n}") for n in (1, 2, 3, 4, 6, 10)]
TABLES.append(pytest.param(flow_table(10, stop=6), id="S6_partial"))  # KSamplerAdvanced end_at_step: last sigma > 0


# ---------------------------------------------------------------- euler: the two-line formula


@pytest.mark.parametrize("sigmas", TABLES)
def test_euler_matches_formula(sigmas):
    model, x = TinyModel(), make_x()
    ref = x.clone()
    for i in range(len(sigmas) - 1):
        d = (ref - model(ref, sigmas[i].expand(1))) / sigmas[i]
        ref = ref + d * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(run_blocks("euler", sigmas, x, model), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dpmpp_2m: k-diffusion's own sample_dpmpp_2m


def _load_k_diffusion_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` from PyPI k-diffusion 0.1.1.post1 without running ``k_diffusion/__init__`` (which
    imports its models, and torchvision through ``utils``): the package and, if absent, torchvision are stubbed in
    sys.modules for the import only, then sys.modules is put back as it was."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
                    "torchdiffeq trampoline scipy tqdm")
    stub_tv = importlib.util.find_spec("torchvision") is None
    names = ["k_diffusion", "k_diffusion.utils", "k_diffusion.sampling"]
    names += ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"] if stub_tv else []
    saved = {n: sys.modules.get(n) for n in names}
    try:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        if stub_tv:
            tv, tr, fn = (types.ModuleType(n) for n in names[3:])
            tv.transforms, tr.functional = tr, fn
            sys.modules.update(dict(zip(names[3:], (tv, tr, fn))))
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


@pytest.fixture(scope="module")
def kd_sampling():
    return _load_k_diffusion_sampling()


@pytest.mark.parametrize("sigmas", TABLES)
def test_dpmpp_2m_matches_k_diffusion(kd_sampling, sigmas):
    model, x = TinyModel(), make_x()
    ref = kd_sampling.sample_dpmpp_2m(model, x.clone(), sigmas, disable=True)
    torch.testing.assert_close(run_blocks("dpmpp_2m", sigmas, x, model), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- uni_pc: diffusers' UniPCMultistepScheduler


def unipc_reference(variant: str, sigmas: torch.Tensor, x_init: torch.Tensor, model) -> torch.Tensor:
    """ComfyUI's uni_pc conventions around diffusers' UniPC solver (solver_order 3, lower_order_final, predict_x0).

    ComfyUI's uni_pc (unlike diffusers' flow-matching mode) reads the table as VE sigmas: the solver state is
    x/√(1+σ²) with alpha = 1/√(1+σ²) — diffusers' non-flow conversion, with prediction_type "sample" fed the x0
    prediction. A final 0 becomes 0.001 and the result is divided by alpha(σ_last). ComfyUI's order is
    min(3, S−1) with lower_order_final, which equals diffusers' min(3, S−k, k+1) for S >= 2; for S = 1 ComfyUI
    makes no update at all, written out here.
    """
    from diffusers import UniPCMultistepScheduler

    table = sigmas.clone()
    if table[-1] == 0:
        table[-1] = 0.001
    steps = len(table) - 1
    if steps == 1:
        return x_init * torch.sqrt(1 + table[1] ** 2) / torch.sqrt(1 + table[0] ** 2)
    sched = UniPCMultistepScheduler(solver_order=3, prediction_type="sample", solver_type=variant,
                                    predict_x0=True, lower_order_final=True)
    sched.set_timesteps(steps)
    sched.sigmas = table.clone()
    sched.timesteps = torch.arange(steps)
    sched.set_begin_index(0)
    x = x_init / torch.sqrt(1 + table[0] ** 2)
    for k in range(steps):
        denoised = model(x * torch.sqrt(1 + table[k] ** 2), table[k].expand(x.shape[0]))
        x = sched.step(denoised, sched.timesteps[k], x).prev_sample
    return x * torch.sqrt(1 + table[-1] ** 2)


@pytest.mark.parametrize("name,variant", [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("sigmas", TABLES)
def test_unipc_matches_diffusers(name, variant, sigmas):
    model, x = TinyModel(), make_x()
    ref = unipc_reference(variant, sigmas, x, model)
    torch.testing.assert_close(run_blocks(name, sigmas, x, model), ref, rtol=1e-11, atol=1e-11)


def test_unipc_bh1_and_bh2_differ():
    model, x, s = TinyModel(), make_x(), flow_table(6)
    assert not torch.allclose(run_blocks("uni_pc", s, x, model), run_blocks("uni_pc_bh2", s, x, model))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_start_is_optional(name):
    model, x, s = TinyModel(), make_x(), flow_table(6)
    torch.testing.assert_close(run_blocks(name, s, x, model, start=False), run_blocks(name, s, x, model),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_finish_is_ksampler_inverse_noise_scaling(name):
    x = make_x()
    full, partial = make_sampler(name, flow_table(6)), make_sampler(name, flow_table(10, stop=6))
    last = 0.001 if name.startswith("uni_pc") else 0.0  # ComfyUI's uni_pc writes 0.001 into KSampler's table
    torch.testing.assert_close(full.finish(x), x / (1.0 - last), rtol=1e-6, atol=0)
    torch.testing.assert_close(partial.finish(x), x / (1.0 - partial.sigmas[-1]), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- state is per object


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_interleaved_blocks_equal_separate_runs(name):
    sigmas = flow_table(7)
    models, inits = (TinyModel(seed=3), TinyModel(seed=4)), (make_x(5), make_x(6))
    alone = [run_blocks(name, sigmas, x, m) for x, m in zip(inits, models)]
    # Pipeline order: block 1 starts one tick after block 0; each tick steps every block in flight.
    smps = [make_sampler(name, sigmas) for _ in range(2)]
    xs = [s.start(x) for s, x in zip(smps, inits)]
    for tick in range(smps[0].steps + 1):
        for j in (1, 0):
            i = tick - j
            if 0 <= i < smps[j].steps:
                assert smps[j].step_index == i
                xs[j] = smps[j].step(xs[j], models[j](xs[j], smps[j].sigmas[i].expand(1)))
    for got, ref in zip(xs, alone):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------- API


def test_unknown_name_lists_supported():
    with pytest.raises(ValueError) as e:
        make_sampler("heun", [1.0, 0.0])
    for n in SAMPLER_NAMES:
        assert n in str(e.value)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_api(name):
    smp = make_sampler(name, (1.0, 0.5, 0.0))
    assert isinstance(smp, BlockSampler) and smp.name == name and smp.steps == 2 and smp.step_index == 0
    assert smp.sigmas.dtype == torch.float32 and smp.sigma == 1.0
    x = make_x(dtype=torch.float32)
    x = smp.step(x, torch.zeros_like(x))
    assert smp.sigma == 0.5 and x.dtype == torch.float32
    smp.step(x, torch.zeros_like(x))
    with pytest.raises(RuntimeError):
        smp.step(x, x)
    with pytest.raises(ValueError):
        make_sampler(name, [1.0])


# ---------------------------------------------------------------- ComfyUI's own code (COMFYUI_PATH)


@pytest.fixture(scope="module")
def comfy():
    samplers, model_sampling, uni_pc, k_sampling = import_comfy(
        "comfy.samplers", "comfy.model_sampling", "comfy.extra_samplers.uni_pc", "comfy.k_diffusion.sampling",
        why="comparing with ComfyUI's own samplers")
    return types.SimpleNamespace(samplers=samplers, model_sampling=model_sampling, uni_pc=uni_pc,
                                 k_sampling=k_sampling)


def _comfy_flow_sampling(comfy, shift: float):
    """ComfyUI's model sampling of a flow (Wan) model: ModelSamplingDiscreteFlow + CONST, as model_base builds it."""
    ms_mod = comfy.model_sampling

    class ModelSampling(ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST):
        pass

    ms = ModelSampling()
    ms.set_parameters(shift=shift)
    return ms


def _comfy_table(comfy, ms, name: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """KSampler.calculate_sigmas / set_steps ("simple" scheduler), penultimate sigma dropped for uni_pc."""
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    discard = name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", total + int(discard))
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas[-(steps + 1):]


class _ModelWrap:
    """Stands in for ComfyUI's CFGGuider: returns the denoised prediction; carries the model sampling object."""

    def __init__(self, model, ms) -> None:
        self.model, self.inner_model = model, types.SimpleNamespace(model_sampling=ms)

    def __call__(self, x, sigma, **kwargs):
        return self.model(x, sigma)


@pytest.mark.comfy_live
def test_comfy_wiring(comfy):
    so = comfy.samplers.sampler_object
    assert so("uni_pc").sampler_function is comfy.uni_pc.sample_unipc
    assert so("uni_pc_bh2").sampler_function is comfy.uni_pc.sample_unipc_bh2
    assert so("euler").sampler_function is comfy.k_sampling.sample_euler
    assert so("dpmpp_2m").sampler_function is comfy.k_sampling.sample_dpmpp_2m
    assert set(SAMPLER_NAMES) <= set(comfy.samplers.KSampler.SAMPLERS)


@pytest.mark.comfy_live
@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("steps,denoise", [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (9, 1.0), (6, 0.6)])
def test_equals_comfyui_ksampler(comfy, name, steps, denoise):
    """Our loop (noise_scaling, start, S steps, finish) equals KSAMPLER.sample bit for bit on CPU float32."""
    ms = _comfy_flow_sampling(comfy, shift=8.0)
    sigmas = _comfy_table(comfy, ms, name, steps, denoise)
    model = TinyModel(dtype=torch.float32)
    noise = make_x(7, torch.float32, (2, 4, 3, 4, 4))
    latent = torch.zeros_like(noise) if denoise >= 0.9999 else make_x(8, torch.float32, noise.shape)
    ref = comfy.samplers.sampler_object(name).sample(_ModelWrap(model, ms), sigmas.clone(), {}, None, noise.clone(),
                                                     latent_image=latent, disable_pbar=True)
    smp = make_sampler(name, sigmas)
    sigma0 = smp.sigmas[0]
    x = smp.start(sigma0 * noise + (1.0 - sigma0) * latent)  # CONST noise_scaling, as KSAMPLER applies it
    for i in range(smp.steps):
        x = smp.step(x, model(x, smp.sigmas[i] * torch.ones(x.shape[0])))
    out = smp.finish(x)
    assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.comfy_live
def test_comfyui_unipc_final_sigma_quirk(comfy):
    """ComfyUI's sample_unipc sets a final 0 of KSampler's own table to 0.001, which inverse_noise_scaling sees."""
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    ms = _comfy_flow_sampling(comfy, shift=1.0)
    noise = make_x(2, torch.float32)
    comfy.samplers.sampler_object("uni_pc").sample(_ModelWrap(TinyModel(dtype=torch.float32), ms), sigmas, {}, None,
                                                   noise, latent_image=torch.zeros_like(noise), disable_pbar=True)
    assert float(sigmas[-1]) == float(make_sampler("uni_pc", [1.0, 0.7, 0.3, 0.0]).final_sigma)
