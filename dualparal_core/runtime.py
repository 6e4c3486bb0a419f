"""A PoolSpec on either side of the process boundary: checked before any spawn, built into one rank's stage after.

The checks read file headers only (:mod:`dualparal_core.files`); the stage builder imports the model code lazily.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

from . import logger
from .config import ModelSource, PoolSpec, WanConfig, check_visible, parse_devices, split_layers
from .files import check_source, inspect_checkpoint, inspect_lora
from .kvcache import KEEPERS

#: PoolSpec.dtype -> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(source: ModelSource) -> WanConfig:
    """The model shape of a source: the random config, or what the checkpoint's header says."""
    if source.random_config is not None:
        return source.random_config
    return inspect_checkpoint(source.path).config


def stage_layers(config: WanConfig, world: int, rank: int) -> range:
    """The layers rank ``rank`` of ``world`` owns."""
    return split_layers(config.num_layers, world)[rank]


_CUDA_COUNTS: dict[tuple, int] = {}


def _count_cuda(env: dict[str, str]) -> int:
    """CUDA devices the workers will see, from a child process (this process may have CUDA state of its own)."""
    key = (env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"))
    if key in _CUDA_COUNTS:
        return _CUDA_COUNTS[key]
    probe = subprocess.run([sys.executable, "-c", "import torch;print(torch.cuda.device_count())"], env=env,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if probe.returncode:
        raise RuntimeError(f"Could not count the CUDA devices (torch failed in a child process):\n"
                           f"{probe.stderr.strip()[-2000:]}")
    _CUDA_COUNTS[key] = int(probe.stdout.strip().splitlines()[-1])
    return _CUDA_COUNTS[key]


def check_nccl(devices) -> None:
    """GPU groups need NCCL. We refuse rather than fall back to gloo: gloo moves every hidden state through host
    memory (hundreds of MB per block-step at 480p), which would make several GPUs slower than one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_nccl_available()):
        raise ValueError(
            f"devices={list(devices)}: DualParal GPU groups need NCCL, which this PyTorch build does not have "
            f"({sys.platform}, torch {torch.__version__}; Windows builds never do). Run ComfyUI under Linux or "
            f"WSL2 for several GPUs, or use CPU ranks (devices='cpu:2') to try the pack here.")


def check_spec(spec: PoolSpec, env: dict[str, str]) -> tuple[PoolSpec, WanConfig]:
    """Every check that can run before a process starts; returns the spec with an absolute model path."""
    if not isinstance(spec, PoolSpec):
        raise TypeError(f"expected a PoolSpec, got {type(spec).__name__}")
    spec.validate()  # every field, also for a spec that skipped __post_init__ (unpickled)
    src, config = check_source(spec.source)
    spec = replace(spec, source=src)
    split_layers(config.num_layers, spec.world_size)
    if spec.compile is None:
        _env_compile(env)  # a bad value is refused here, before any worker starts
    devices = parse_devices(spec.devices, attach=False)  # again: an unpickled spec skipped __post_init__
    from .attention import check_backend

    check_backend(spec.attention)  # a missing FlashAttention-3 is named here, before any worker starts
    if spec.matmul == "fp8":
        from .fp8_gemm import check_request

        check_request(devices, spec.dtype)
    if devices[0].startswith("cuda"):
        check_visible(devices, _count_cuda(env), shown=repr(list(spec.devices)), seen_by="the workers see",
                      cuda_visible=env.get("CUDA_VISIBLE_DEVICES"))
        check_nccl(spec.devices)  # after visibility: "no such GPU" is the more useful message on a CPU-only box
    return spec, config


def build_stage(spec: PoolSpec, rank: int, device: str | torch.device | None = None):
    """Build and load rank ``rank``'s model: a :class:`~dualparal_core.model.WanStage`, or for an expert pair
    an :class:`~dualparal_core.experts.Experts` of two stages of the same layers; returns (model, info dict).

    Only this rank's slice of each expert is read from its file, straight into the stage (built on the meta
    device, loaded with ``assign``: no second copy); random weights are seeded per tensor name, so every layer
    split gives the same model. Each expert's LoRAs (``ModelSource.expert_loras``) are merged into its slice.
    """
    t0 = time.perf_counter()
    src, config = check_source(spec.source)
    world = spec.world_size
    layers = stage_layers(config, world, rank)
    dev = torch.device(device if device is not None else spec.devices[rank])
    embed, head = rank == 0, rank == world - 1
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    from .attention import resolve_backend

    backend = resolve_backend(spec.attention, dev, TORCH_DTYPES[spec.dtype])  # "auto" picks for this device
    stages = [_build_expert(spec, src, e, config, layers, dev, backend) for e in range(2 if src.two_experts else 1)]
    if len(stages) == 1:
        model = stages[0]
    else:
        from .experts import Experts

        model = Experts(stages, src.boundary)
    load_s = time.perf_counter() - t0
    actual = sum(t.numel() * t.element_size() for st in stages for t in (*st.parameters(), *st.buffers()))
    logger.info("rank %d: layers %d..%d%s%s on %s (%s%s, %d expert%s) ready in %.2f s", rank, layers.start,
                layers.stop - 1, " +embed" if embed else "", " +head" if head else "", dev, spec.dtype,
                ", fp8 weights" if spec.weights == "fp8" else "", len(stages), "s" if len(stages) > 1 else "",
                load_s)
    from .memplan import load_report, weight_bytes

    planned = len(stages) * weight_bytes(config, layers, embed=embed, head=head, dtype=spec.dtype,
                                         fp8=spec.weights == "fp8")
    report = load_report(config, layers, embed=embed, head=head, dtype=spec.dtype, fp8=spec.weights == "fp8",
                         experts=len(stages), actual_weight_bytes=actual)
    if dev.type == "cuda":
        report += (f"; CUDA allocated {torch.cuda.memory_allocated(dev) / 2**30:.2f}, peak while loading "
                   f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f}")
    logger.info("rank %d: %s", rank, report)
    return model, {"config": config, "layers": (layers.start, layers.stop), "load_s": load_s, "attention": backend,
                   "experts": len(stages), "weight_bytes": actual, "planned_weight_bytes": planned}


def _build_expert(spec: PoolSpec, src: ModelSource, expert: int, config: WanConfig, layers: range,
                  dev: torch.device, backend: str):
    """One expert's stage of ``layers`` on ``dev``, with its LoRAs merged (and fp8 Linears / GEMMs when asked)."""
    from . import fp8 as f8
    from .model import WanStage

    dtype, keep_fp8 = TORCH_DTYPES[spec.dtype], spec.weights == "fp8"
    embed, head = layers.start == 0, layers.stop == config.num_layers
    loras = src.expert_loras(expert)
    path = src.path if expert == 0 else src.low_noise_path
    stage = WanStage(config, layers, embed=embed, head=head, dtype=dtype, device="meta" if path else dev,
                     attention_backend=backend)
    if path is not None:
        from .checkpoint import load_stage_weights

        sd = load_stage_weights(path, layers, embed=embed, head=head, dtype=dtype, device=dev, keep_fp8=keep_fp8)
    else:
        stage.init_random(src.random_seed if expert == 0 else src.random_low_seed)
        sd = stage.state_dict() if (loras or keep_fp8) else None
        if keep_fp8:
            f8.quantise_state_dict(sd)
    if loras:
        from .lora import merge_loras

        # fp8 weights a LoRA changes are dequantised, merged in the compute dtype and quantised again
        touched = f8.dequantise_state_dict(sd, _lora_weight_keys(loras, sd), dtype) if keep_fp8 else []
        merge_loras(sd, loras, layers)
        f8.quantise_state_dict(sd, touched)
    if sd is not None:
        if keep_fp8:
            f8.install_fp8_linears(stage, sd, dtype)
        stage.load_weights(sd, assign=path is not None)
    del sd
    stage.eval()
    stage.fuse_qkv()  # after LoRAs are merged: one GEMM for q, k and v
    stage.kv_keep = KEEPERS[spec.kv_cache]  # the right-context K/V as computed, or in e4m3 (kvcache.py)
    compiled = wants_compile(spec, dev)
    if compiled:
        stage.compile_elementwise()
    if spec.matmul == "fp8":  # last: quantised from the final (merged, fused) weights
        from .fp8_gemm import install_scaled_mm

        install_scaled_mm(stage, dev, compiled=compiled)
    return stage


def wants_compile(spec: PoolSpec, dev: torch.device) -> bool:
    """PoolSpec.compile when set; else DUALPARAL_COMPILE=0/1 from the environment; else on for CUDA only.

    The environment switch exists for users who need the same latents on any number of GPUs: on two H200s the
    compiled elementwise chains made 1 and 2 GPUs differ slightly, the plain ops are bit-identical (README)."""
    if spec.compile is not None:
        return bool(spec.compile)
    env = _env_compile(os.environ)
    return dev.type == "cuda" if env is None else env


def _env_compile(env) -> bool | None:
    value = env.get("DUALPARAL_COMPILE", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"DUALPARAL_COMPILE must be 0 or 1 (unset: on for GPUs); got {value!r}.")
    return None if not value else value == "1"


def _lora_weight_keys(loras, sd) -> list[str]:
    """The weights of ``sd`` that the LoRA files change."""
    mods = {m for entry in loras for m in inspect_lora(os.fspath(entry[0])).targets}
    return [k for m in mods for k in (m + ".weight", m) if k in sd]
