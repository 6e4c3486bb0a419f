"""DualParal Sampler: conditioning + latent -> LATENT, sampled block-wise over the Loader's worker group."""

from __future__ import annotations

import torch

from dualparal_core.config import NOISE_MODES, SAMPLER_NAMES, SamplingConfig
from dualparal_core.protocol import Job

from . import bridge
from .bridge import ModelSocket, io
from .image import image_conditioning
from .prompts import conditionings
from .timeline import TRANSITION_INPUT, job_status
from .types import (
    DualParalModel,
    check_latent_dict,
    check_latent_shape,
    from_model_space,
    missing_gpus,
    output_latent,
    to_model_space,
)


def _sigma_table(sigmas, steps: int, sampler_name: str, scheduler: str, shift: float, denoise: float) -> torch.Tensor:
    if sigmas is None:
        return bridge.compute_sigmas(steps, sampler_name, scheduler, shift, denoise)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise ValueError("sigmas must be a 1-D SIGMAS tensor (from a scheduler node such as BasicScheduler).")
    return sigmas.detach().to("cpu", torch.float32)


class DualParalSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalSampler",
            display_name="DualParal Sampler",
            category="DualParal",
            description="Samples a long Wan video block by block, pipelined over the Loader's GPUs (DualParal). "
                        "Returns a LATENT exactly like KSampler, ready for VAE Decode. With one block "
                        "(num_per_block >= latent frames), num_cat 0 and independent noise it matches KSampler.",
            inputs=[
                ModelSocket.Input("model", tooltip="The worker group from a DualParal Loader."),
                io.Conditioning.Input("positive", tooltip="CLIP Text Encode (umt5-xxl), or WanImageToVideo for I2V."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (unused when cfg is 1.0)."),
                io.Latent.Input("latent_image",
                                tooltip="Video latent, e.g. Empty Hunyuan Latent Video (frames = (length-1)/4+1). "
                                        "A batch of B latents gives B videos."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Denoising steps per block."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1.0 skips the negative pass (2x faster)."),
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES), default="uni_pc",
                               tooltip="Sampler, computed exactly as ComfyUI's sampler of the same name."),
                io.Combo.Input("scheduler", options=bridge.SCHEDULERS, default="simple",
                               tooltip="ComfyUI scheduler that turns steps into sigmas."),
                io.Float.Input("shift", default=8.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Flow shift (what ModelSamplingSD3 sets; Wan2.1 T2V default 8.0; 3.0 is "
                                       "common for 480p with the 1.3B model)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1.0 only the last steps/denoise part of the schedule runs (as "
                                       "KSampler), starting from the input latent."),
                io.Int.Input("num_per_block", default=8, min=1, max=4096,
                             tooltip="Latent frames per block (P); the first block takes P + num_cat. Each block "
                                     "sees P + num_cat frames, so memory does not grow with video length."),
                io.Int.Input("num_cat", default=8, min=0, max=4096,
                             tooltip="Context frames (K) shared with each neighbouring block for smooth "
                                     "transitions; 0 disables context; at most num_per_block."),
                io.Combo.Input("noise_mode", options=list(NOISE_MODES), default="coordinated",
                               tooltip="coordinated: every block's noise reshuffles one P+K-frame template "
                                       "(consistent motion, the paper's choice); independent: KSampler's noise."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional SIGMAS (e.g. from BasicScheduler); replaces steps, scheduler, "
                                        "shift and denoise."),
                io.Float.Input("cfg_low", default=-1.0, min=-1.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Guidance of the low-noise expert when the Loader has one (Wan2.2 A14B), "
                                       "e.g. 1.0 with a distilled (lightx2v) LoRA on it. Negative (-1): the same "
                                       "as cfg. Ignored with one model."),
                TRANSITION_INPUT],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="Denoised latent, raw VAE space.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, shift: float, denoise: float, num_per_block: int,
                num_cat: int, noise_mode: str, sigmas=None, cfg_low: float = -1.0,
                transition: int = 0) -> io.NodeOutput:
        if not isinstance(model, DualParalModel):
            raise ValueError("model is not a DUALPARAL_MODEL; connect a DualParal Loader (ComfyUI MODEL outputs "
                             "cannot be used by the DualParal Sampler).")
        gone = missing_gpus(model.spec.devices, bridge.gpu_count())
        if gone:
            raise RuntimeError(f"model: the Loader placed ranks on {gone}, which this ComfyUI process no longer "
                               f"sees ({bridge.gpu_count()} GPUs now). Set the Loader's devices to GPUs that exist.")
        cfgm = model.config
        samples = bridge.fix_latent(check_latent_dict(latent_image))
        check_latent_shape(samples, cfgm)
        low = float(cfg_low) if getattr(model, "experts", 1) == 2 and cfg_low is not None and cfg_low >= 0 else None
        guided = cfg != 1.0 or (low is not None and low != 1.0)
        cond, uncond, timeline = conditionings(positive, negative, guided, cfgm.text_dim, transition or 0)
        table = _sigma_table(sigmas, steps, sampler_name, scheduler, shift, denoise)
        if table.numel() < 2:  # denoise 0 (or an empty SIGMAS): KSampler returns the latent unchanged
            return io.NodeOutput(output_latent(latent_image, samples))
        sc = SamplingConfig(sigmas=tuple(float(s) for s in table), sampler=sampler_name, cfg=float(cfg),
                            seed=int(seed), noise_mode=noise_mode, num_per_block=int(num_per_block),
                            num_cat=int(num_cat), cfg_low=low)
        fmt = bridge.latent_format()
        image = image_conditioning(positive, negative if guided else None, cfgm, tuple(samples.shape),
                                   fmt.process_in, *bridge.concat_resizers())
        noise = None
        if noise_mode == "independent" and latent_image.get("batch_index") is not None:
            noise = bridge.prepare_noise(samples, seed, latent_image["batch_index"])
        job = Job(sampling=sc, shape=tuple(samples.shape), cond=cond, uncond=uncond,
                  latent=to_model_space(samples, fmt), noise=noise, preview=bridge.previews_enabled(),
                  timeline=timeline, image=image)
        job.validate(cfgm)  # every remaining check, before any GPU work
        node_id = cls.hidden.unique_id if cls.hidden else None
        pool = bridge.acquire(model)
        try:
            x = bridge.run_job(model, pool, job, node_id, job_status(job, node_id))
        finally:
            if not model.keep_alive:
                bridge.release(model, "keep_alive is off")
        return io.NodeOutput(output_latent(latent_image, from_model_space(x, fmt)))
