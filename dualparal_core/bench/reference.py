"""The published DualParal code (DualParal-Project/DualParal, a checkout given by ``bench --reference DIR``) run
with random weights: its example's unchanged ``main`` (the schedule, the queue, the NCCL pipeline, the UniPC steps)
in one process per GPU, with our ``prepare_model`` in place of its own, which would download a diffusers pipeline.

Ours builds what the published one loads: diffusers' WanTransformer3DModel of the model's shape with seeded random
weights, the Wan2.1 UniPC scheduler (flow prediction, bh2, flow shift from its ``--flow_shift``), and a stand-in
pipeline whose ``encode_prompt`` returns seeded random text embeddings (no text encoder) and whose ``get_video``
returns the latents (no VAE). Nothing of the checkout is copied: it is imported from ``DIR`` at run time. Its time
is the line its ``main`` prints ("Whole inference time"), which excludes the model build and its own warm-up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import types
from pathlib import Path

import torch

from dualparal_core.config import WanConfig

EXAMPLE = "examples/DualParal_Wan.py"
#: The files of the checkout the harness needs (checked before anything starts).
NEEDED = (EXAMPLE, "src/pipelines/pipeline_Wan.py", "src/distribution_utils.py")
#: Wan2.1's diffusers scheduler: UniPC on flow sigmas, bh2, order 2 (flow_shift comes from the example's flag).
WAN_UNIPC = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
                 solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
TIME_LINE = re.compile(r"Whole inference time ([0-9.]+)s")
#: Why a one-GPU reference row is not run (the published code's world-size-1 path sends to itself over NCCL).
ONE_GPU = ("not runnable on 1 GPU: the published code's world-size-1 path calls NCCL isend to itself and fails "
           "(ncclSocketInit: connecting to address with family 0)")


def missing_files(root: str) -> list[str]:
    return [f for f in NEEDED if not (Path(root) / f).is_file()]


class StandInPipeline:
    """What the published code reads from a diffusers WanPipeline, without a text encoder or a VAE."""

    vae_scale_factor_spatial = 8

    def __init__(self, transformer, scheduler, text_dim: int, seed: int = 0):
        self.transformer, self.transformer_2, self.scheduler = transformer, None, scheduler
        self.vae, self.tokenizer, self.text_encoder = _NoVAE(), None, None
        self.text_dim, self.seed = text_dim, seed

    def to(self, device, dtype, **kw):
        self.transformer.to(device=device, dtype=dtype, **kw)
        return self

    def encode_prompt(self, *, max_sequence_length=512, device=None, dtype=None, **_):
        g = torch.Generator().manual_seed(self.seed)
        pos, neg = (torch.randn(1, max_sequence_length, self.text_dim, generator=g) for _ in range(2))
        return pos.to(device, dtype), neg.to(device, dtype)


class _NoVAE:
    def to(self, *a, **kw):
        return self


def _stub_lightning() -> None:
    """The example imports pytorch_lightning for ``seed_everything`` alone; where it is not installed, a module
    with that one function (Python, NumPy and torch seeds) stands in."""
    if importlib.util.find_spec("pytorch_lightning") is not None:
        return
    import random

    import numpy as np

    def seed_everything(seed: int, *a, **kw) -> int:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return seed

    stub = types.ModuleType("pytorch_lightning")
    stub.seed_everything = seed_everything
    sys.modules["pytorch_lightning"] = stub


def load_example(root: str):
    """The checkout's example module, imported from ``root`` (its ``src`` package on the path)."""
    sys.path.insert(0, str(Path(root).resolve()))
    _stub_lightning()
    spec = importlib.util.spec_from_file_location("dualparal_published_example", Path(root) / EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare_model(mod, config: WanConfig, args, parallel_config, runtime_config):
    """Our stand-in for the example's ``prepare_model``: same return value, same changes to ``args``."""
    from diffusers import WanTransformer3DModel
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    device = parallel_config.device
    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**config.diffusers_kwargs())
    scheduler = UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=args.flow_shift)
    pipe = mod.DualParalWanPipeline(StandInPipeline(transformer, scheduler, config.text_dim), parallel_config,
                                    runtime_config)
    pipe.to_device(device=device, dtype=runtime_config.dtype, non_blocking=True)
    pipe.get_video = lambda latents, **kw: [latents]  # no VAE: rank 0 "decodes" to the latents
    args.height = int(args.height) // pipe.model.vae_scale_factor_spatial
    args.width = int(args.width) // pipe.model.vae_scale_factor_spatial
    if device.type == "cuda":  # the fp32 build above is ours, not the published code's: its peak starts here
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return pipe, pipe.model.transformer.config.in_channels


def example_argv(spec: dict, out_dir: str) -> list[str]:
    """The example's own flags for this row (its parser reads them)."""
    return ["DualParal_Wan.py", "--dtype", spec["dtype"], "--height", str(spec["height"]), "--width",
            str(spec["width"]), "--sample_steps", str(spec["steps"]), "--flow_shift", str(spec["shift"]),
            "--sample_guide_scale", str(spec["cfg"]), "--num_per_block", str(spec["P"]), "--num_cat",
            str(spec["K"]), "--latents_num", str(spec["frames"]), "--save_file", out_dir.rstrip("/") + "/"]


class _Tee(io.TextIOBase):
    def __init__(self, out):
        self.out, self.text = out, []

    def write(self, s: str) -> int:
        self.text.append(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def run(spec: dict, rank: int, world: int, out_dir: str) -> dict:
    """One rank of the published code's ``main`` on random weights; its printed time and this GPU's peak."""
    config = WanConfig(**spec["config"])
    mod = load_example(spec["reference"])
    argv, sys.argv = sys.argv, example_argv(spec, out_dir)
    try:
        args = mod._parse_args()
    finally:
        sys.argv = argv
    mod.prepare_model = lambda a, pc, rc: prepare_model(mod, config, a, pc, rc)
    mod.export_to_video = lambda *a, **kw: None
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        mod.main(args, rank, world)
    times = TIME_LINE.findall("".join(tee.text))
    if not times:
        raise RuntimeError("the published code printed no 'Whole inference time' line")
    dev = torch.device(f"cuda:{rank}")
    return dict(seconds=float(times[-1]), peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30, device_name=torch.cuda.get_device_name(dev))
