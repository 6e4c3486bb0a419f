"""A PoolSpec on either side of the process boundary: checked before any spawn, built into one rank's stage after."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

from . import logger
from .config import ModelSource, PoolSpec, WanConfig, split_layers

#: PoolSpec.dtype -> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_source(source: ModelSource) -> None:
    """Refuse what the workers cannot load yet, with a sentence naming the input."""
    if source.low_noise_path is not None:
        raise ValueError("low_noise_path (a second Wan2.2 expert) is not supported by the DualParal workers yet; "
                         "load one expert per Loader.")


def model_config(source: ModelSource) -> WanConfig:
    """The model shape of a source: the random config, or what the checkpoint's header says."""
    if source.random_config is not None:
        return source.random_config
    from .checkpoint import inspect_checkpoint

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
    src = spec.source
    check_source(src)
    if src.path is not None:
        path = os.path.abspath(os.path.expanduser(os.fspath(src.path)))
        if not os.path.isfile(path):
            raise ValueError(f"Checkpoint '{path}' does not exist; check the model path.")
        from .checkpoint import inspect_checkpoint

        config = inspect_checkpoint(path).config
        spec = replace(spec, source=replace(src, path=path))
    else:
        config = src.random_config
    split_layers(config.num_layers, spec.world_size)
    gpus = [d for d in spec.devices if d.startswith("cuda")]
    if gpus:
        if any(not d.startswith("cuda:") or not d[5:].isdigit() for d in gpus):
            raise ValueError(f"devices={list(spec.devices)}: name each GPU by index, e.g. 'cuda:0', 'cuda:1'.")
        check_nccl(spec.devices)
        visible = _count_cuda(env)
        missing = [d for d in gpus if int(d[5:]) >= visible]
        if missing:
            cvd = env.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(
                f"devices={list(spec.devices)} asks for {', '.join(missing)}, but the workers see {visible} CUDA "
                f"device(s) (CUDA_VISIBLE_DEVICES={'unset' if cvd is None else repr(cvd)}). Use devices among "
                + (f"cuda:0..cuda:{visible - 1}" if visible else "'cpu'")
                + ", or make more GPUs visible (ComfyUI's --cuda-device sets CUDA_VISIBLE_DEVICES).")
    return spec, config


def build_stage(spec: PoolSpec, rank: int, device: str | torch.device | None = None):
    """Build and load rank ``rank``'s :class:`~dualparal_core.model.WanStage`; returns (stage, info dict).

    Only this rank's slice is read from a checkpoint file; random weights are seeded per tensor name, so every
    layer split gives the same model. LoRAs whose expert is not "low" are merged into the slice.
    """
    from .model import WanStage

    check_source(spec.source)
    t0 = time.perf_counter()
    config = model_config(spec.source)
    world = spec.world_size
    layers = stage_layers(config, world, rank)
    dev = torch.device(device if device is not None else spec.devices[rank])
    dtype = TORCH_DTYPES[spec.dtype]
    embed, head = rank == 0, rank == world - 1
    stage = WanStage(config, layers, embed=embed, head=head, dtype=dtype, device=dev,
                     attention_backend=spec.attention)
    loras = [e for e in spec.source.loras if len(e) < 3 or str(e[2]).lower() != "low"]
    if spec.source.path is not None:
        from .checkpoint import load_stage_weights

        sd = load_stage_weights(spec.source.path, layers, embed=embed, head=head, dtype=dtype, device=dev)
    else:
        stage.init_random(spec.source.random_seed)
        sd = stage.state_dict() if loras else None
    if loras:
        from .lora import merge_loras

        merge_loras(sd, loras, layers)
    if sd is not None:
        stage.load_weights(sd)
    del sd
    stage.eval()
    stage.fuse_qkv()  # after LoRAs are merged: one GEMM for q, k and v
    if spec.compile if spec.compile is not None else dev.type == "cuda":
        stage.compile_elementwise()
    load_s = time.perf_counter() - t0
    logger.info("rank %d: layers %d..%d%s%s on %s (%s) ready in %.2f s", rank, layers.start, layers.stop - 1,
                " +embed" if embed else "", " +head" if head else "", dev, spec.dtype, load_s)
    return stage, {"config": config, "layers": (layers.start, layers.stop), "load_s": load_s}
