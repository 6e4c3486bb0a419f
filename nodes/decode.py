"""Block Decode: LATENT + VAE -> IMAGE (and/or a video file), decoded block by block with the causal cache carried
over, so the result equals core VAE Decode while memory stays flat in video length; optionally spread over the
GPUs of a DualParal Loader's worker group (one primed span per GPU)."""

from __future__ import annotations

import json
import logging
import math
import os

import torch

from dualparal_core.decode import (
    MAX_CRF,
    MIN_SPEEDUP,
    VIDEO_FORMATS,
    FrameSink,
    VideoWriter,
    count_blocks,
    decode_local,
    num_pixel_frames,
)

from . import bridge
from .bridge import ModelSocket, io
from .types import DualParalModel

logger = logging.getLogger("DualParal")
#: DUALPARAL_DECODE_PARALLEL: "auto" (split when it pays, see plan_spans), "always" (every rank), "never".
PARALLEL_MODES = {"auto": MIN_SPEEDUP, "always": 0.0, "never": math.inf}


def _latent(samples) -> torch.Tensor:
    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise ValueError("samples is not a LATENT; connect a DualParal Sampler, KSampler or another latent.")
    z = samples["samples"]
    if z.ndim != 5 or z.shape[1] != 16 or min(z.shape) < 1:
        hint = " (a Wan2.2 TI2V-5B latent: use VAE Decode)" if z.ndim == 5 and z.shape[1] == 48 else ""
        raise ValueError(f"samples has shape {list(z.shape)}{hint}; Block Decode takes Wan2.1-VAE video latents "
                         f"[batch, 16, frames, height/8, width/8].")
    return z


def _weights(vae) -> dict:
    # imported here, not when ComfyUI loads the pack: dualparal_core.vae imports diffusers (seconds)
    from dualparal_core.vae import decoder_state_dict

    model = getattr(vae, "first_stage_model", None)
    if model is None or not hasattr(model, "state_dict"):
        raise ValueError("vae is not a ComfyUI VAE; connect Load VAE (wan_2.1_vae.safetensors).")
    try:
        return decoder_state_dict(model.state_dict(), source="vae")
    except ValueError as e:
        raise ValueError(f"{e} Block Decode needs the Wan2.1 VAE (wan_2.1_vae.safetensors).") from None


def _check_output(filename_prefix: str, return_frames: bool, format: str, crf: int) -> str:
    """The file name prefix, after refusing outputs that cannot be written (before any decoding)."""
    prefix = filename_prefix.strip()
    if not prefix and not return_frames:
        raise ValueError("return_frames is off and filename_prefix is empty: there is nothing to output. Give a "
                         "filename_prefix (the video file) or turn return_frames on.")
    if format not in VIDEO_FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(VIDEO_FORMATS)}.")
    if crf > MAX_CRF[format]:
        raise ValueError(f"crf={crf} is out of range for {format} (0..{MAX_CRF[format]}).")
    return prefix


def _min_speedup() -> float:
    mode = os.environ.get("DUALPARAL_DECODE_PARALLEL", "auto").strip().lower()
    if mode not in PARALLEL_MODES:
        raise ValueError(f"DUALPARAL_DECODE_PARALLEL={mode!r} is not one of {sorted(PARALLEL_MODES)}.")
    return PARALLEL_MODES[mode]


class DualParalBlockDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalBlockDecode",
            display_name="Block Decode",
            category="DualParal",
            description="Decodes a long Wan video latent block by block, carrying the VAE's causal cache, so the "
                        "frames equal VAE Decode's while memory stays flat in video length. Optionally spread over "
                        "a DualParal Loader's GPUs, and streamed straight to an mp4/webm file.",
            inputs=[
                io.Latent.Input("samples", tooltip="The video latent (e.g. from the DualParal Sampler)."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE from Load VAE (wan_2.1_vae.safetensors)."),
                io.Int.Input("block_size", default=4, min=1, max=4096,
                             tooltip="Latent frames decoded per block (1 latent frame = 4 video frames). Does "
                                     "not change the result; larger blocks mean fewer, bigger transfers."),
                io.String.Input("filename_prefix", default="",
                                tooltip="Empty: no file. Otherwise the video is written to ComfyUI's output "
                                        "folder as it is decoded (e.g. video/DualParal)."),
                io.Combo.Input("format", options=list(VIDEO_FORMATS), default="mp4",
                               tooltip="File format: mp4 (h264) or webm (vp9), yuv420p."),
                io.Float.Input("fps", default=16.0, min=1.0, max=240.0, step=1.0,
                               tooltip="Frame rate of the file (Wan2.1 and Wan2.2 A14B: 16)."),
                io.Int.Input("crf", default=19, min=0, max=max(MAX_CRF.values()),
                             tooltip="Quality of the file: lower is better and larger (h264 0-51, vp9 0-63)."),
                io.Boolean.Input("return_frames", default=True,
                                 tooltip="Return every frame as IMAGE. Off (with a file): only the last frame is "
                                         "returned, so a minute-long video never sits in memory."),
                ModelSocket.Input("model", optional=True,
                                  tooltip="A DualParal Loader: decode on its workers' GPUs, one span per GPU. "
                                          "Without it (or when its workers are not running) ComfyUI's device "
                                          "decodes."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="Frames [N, H, W, 3] as VAE Decode returns them (only the last "
                                             "frame when return_frames is off).")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples, vae, block_size: int, filename_prefix: str, format: str, fps: float, crf: int,
                return_frames: bool, model=None) -> io.NodeOutput:
        z = _latent(samples)
        weights = _weights(vae)
        if model is not None and not isinstance(model, DualParalModel):
            raise ValueError("model is not a DUALPARAL_MODEL; connect a DualParal Loader or leave it empty.")
        prefix = _check_output(filename_prefix, return_frames, format, crf)
        b, _, t, h, w = z.shape
        height, width, frames = 8 * h, 8 * w, num_pixel_frames(t)
        dtype = getattr(vae, "vae_dtype", torch.float32)
        hidden = cls.hidden
        node_id = hidden.unique_id if hidden else None
        writer = file = subfolder = None
        if prefix:
            path, file, subfolder = bridge.video_output_path(prefix, width, height, VIDEO_FORMATS[format][0])
            writer = VideoWriter(path, width, height, fps, format, crf, metadata=cls._metadata())
        sink = FrameSink(b, frames, height, width, keep=bool(return_frames), writer=writer,
                         spool_dir=bridge.temp_directory())
        try:
            pool = bridge.live_pool(model) if model is not None else None
            if model is not None and pool is None:
                logger.info("Block Decode: the DualParal workers are not running (keep_alive off or unloaded); "
                            "decoding on ComfyUI's device instead of starting them")
            if pool is not None:
                cls._on_pool(model, pool, z, weights, dtype, block_size, sink, node_id)
            else:
                from dualparal_core.vae import WanVAEDecoder

                device = bridge.decode_device(vae)
                decoder = WanVAEDecoder.from_state_dict(weights, dtype, device, source="vae")
                del weights
                bridge.free_vram_for_decode(vae, tuple(z.shape), dtype, device)
                total = count_blocks([(0, t)], block_size, b)
                decode_local(decoder, z, block_size, sink, on_progress=bridge.progress_bar(total, node_id))
                del decoder
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        ui = bridge.video_ui(file, subfolder) if writer is not None else None
        return io.NodeOutput(sink.image, ui=ui)

    @classmethod
    def _on_pool(cls, model, pool, z, weights, dtype, block_size, sink, node_id) -> None:
        from dualparal_core.client.decode import decode_on_pool, decoder_geometry
        from dualparal_core.decode import plan_spans

        prime = decoder_geometry(weights)[0]
        spans = plan_spans(z.shape[2], len(pool.ready_info), prime, _min_speedup())
        total = count_blocks(spans, block_size, z.shape[0])
        bridge.pool_decode(model, decode_on_pool, pool, z, weights, sink, dtype=dtype, block_size=block_size,
                           on_progress=bridge.progress_bar(total, node_id), should_cancel=bridge.interrupted,
                           spans=spans)

    @classmethod
    def _metadata(cls) -> dict[str, str] | None:
        hidden = cls.hidden
        if hidden is None or not bridge.metadata_enabled():
            return None
        meta = {}
        if hidden.prompt is not None:
            meta["prompt"] = json.dumps(hidden.prompt)
        for key, value in (hidden.extra_pnginfo or {}).items():
            meta[key] = json.dumps(value)
        return meta or None
