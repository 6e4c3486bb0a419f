"""Block Decode vs a core-style full decode: time and peak memory per GPU (the issue's table).

    python benchmarks/bench_decode.py --vae models/vae/wan_2.1_vae.safetensors      # 257 latent frames, 480x832
    python benchmarks/bench_decode.py --devices 0,1,2,3                             # random Wan2.1 weights
    python benchmarks/bench_decode.py --tiny                                        # CPU, 2 ranks, seconds

Rows (all in the same dtype, default bf16 on GPUs):

- *core-style full decode*: what ComfyUI's VAE Decode does for Wan (``comfy/ldm/wan/vae.py``): the post-quant conv
  on the whole latent, one decoder call per latent frame with one cache, the outputs concatenated on the GPU
  (``torch.cat`` per frame), then ``process_output`` + ``movedim`` and the copy to the CPU;
- *Block Decode, 1 GPU*: ``decode_local`` on GPU 0, blocks of ``--block`` latent frames into the IMAGE on the CPU;
- *Block Decode, N GPUs*: a worker group on ``--devices`` (a tiny transformer stands in for the model), one primed
  span per GPU (``plan_spans`` with ``--min-speedup``, default 0: every GPU), frames sent back as float32. The first
  decode (a short latent) uploads the weights and warms the kernels (reported as *cold*); the table's time is the
second, whole-video decode (*warm*).

Peak GiB is ``torch.cuda.max_memory_allocated`` per GPU (the workers report theirs). The last column is the largest
difference from the core-style frames (0 when bit-identical). ``--mode file`` streams an mp4 instead of building the
IMAGE (uint8 from the workers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dualparal_core.decode import (  # noqa: E402
    FrameSink,
    VideoWriter,
    decode_local,
    num_pixel_frames,
    plan_spans,
    to_image,
)
from dualparal_core.vae import WanVAEDecoder, decoder_state_dict  # noqa: E402

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weights(args) -> dict:
    if args.vae:
        from safetensors.torch import load_file

        return decoder_state_dict(load_file(args.vae), source=args.vae)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=args.base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True])
    return {k: v.detach().clone() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant"))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


@torch.no_grad()
def core_style(dec: WanVAEDecoder, z: torch.Tensor) -> torch.Tensor:
    x = dec.post_quant_conv(z.to(dec.device, dec.dtype))
    cache: list = [None] * dec._num_convs
    out = None
    for i in range(z.shape[2]):
        o = dec.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
        out = o if out is None else torch.cat([out, o], 2)
    return to_image(out.to("cpu"))[0]  # ComfyUI: .to(output_device).float(), process_output, movedim


def sink_for(args, frames: int, h: int, w: int, tmp: str) -> FrameSink:
    if args.mode == "file":
        return FrameSink(1, frames, h, w, keep=False, writer=VideoWriter(Path(tmp) / "bench.mp4", w, h, 16.0),
                         spool_dir=tmp)
    return FrameSink(1, frames, h, w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", help="wan_2.1_vae.safetensors (default: random Wan2.1 weights)")
    ap.add_argument("--frames", type=int, default=257, help="latent frames (257 = 1025 video frames)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--block", type=int, default=4, help="latent frames per block")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--devices", default=None, help="GPU indices for the group, e.g. 0,1 (default: 0,1; cpu:2)")
    ap.add_argument("--min-speedup", type=float, default=0.0, help="plan_spans threshold (0: use every GPU)")
    ap.add_argument("--mode", choices=["image", "file"], default="image")
    ap.add_argument("--base-dim", type=int, default=None, help="width of the random VAE (default 96 = Wan2.1; "
                    "16 with --tiny)")
    ap.add_argument("--skip-core", action="store_true", help="skip the core-style row (it needs the most memory)")
    ap.add_argument("--tiny", action="store_true", help="CPU, 2 ranks, 45 latent frames at 16x16 pixels, a narrow "
                    "random VAE with Wan2.1's structure")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width = 45, 16, 16
        args.devices = args.devices or "cpu:2"
        args.base_dim = args.base_dim or 16
    args.base_dim = args.base_dim or 96
    cuda = torch.cuda.is_available() and not (args.devices or "").startswith("cpu")
    args.devices = args.devices or ("0,1" if cuda else "cpu:2")
    devices = (("cpu",) * int(args.devices[4:]) if args.devices.startswith("cpu:")
               else tuple(f"cuda:{int(i)}" for i in args.devices.split(",")))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    device = torch.device(devices[0])
    sd = weights(args)
    dec = WanVAEDecoder.from_state_dict(sd, dtype, device)
    h, w = args.height // 8, args.width // 8
    z = torch.randn(1, 16, args.frames, h, w, generator=torch.Generator().manual_seed(0))
    frames = num_pixel_frames(args.frames)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, {dtype}: {args.frames} latent frames ({frames} video frames) at "
          f"{args.width}x{args.height}, block {args.block}, prime {dec.prime_frames}, mode {args.mode}")
    rows, ref = [], None
    tmp = tempfile.mkdtemp(prefix="bench-decode-")

    def row(label: str, seconds: float, peaks: list, diff) -> None:
        gib = " / ".join("n/a" if p is None else f"{p:.2f}" for p in peaks)
        rows.append({"row": label, "seconds": seconds, "peak_gib": peaks, "max_abs_diff": diff})
        print(f"| {label} | {seconds:.1f} | {gib} | {'-' if diff is None else f'{diff:.2e}'} |", flush=True)

    print("| decode | seconds | peak GiB per GPU | max abs diff vs core |")
    print("|---|---|---|---|")
    if not args.skip_core:
        reset_peak(device)
        t0 = time.perf_counter()
        ref = core_style(dec, z)
        sync(device)
        row("core-style full decode, 1 device", time.perf_counter() - t0, [peak(device)], 0.0)

    def diff(sink: FrameSink):
        return None if ref is None or not sink.keeps else float((sink.image - ref).abs().max())

    reset_peak(device)
    sink = sink_for(args, frames, args.height, args.width, tmp)
    t0 = time.perf_counter()
    decode_local(dec, z, args.block, sink)
    sync(device)
    sink.finish()
    row("Block Decode, 1 device", time.perf_counter() - t0, [peak(device)], diff(sink))
    prime = dec.prime_frames
    del dec, sink
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from dualparal_core.client.decode import decode_on_pool
    from dualparal_core.config import ModelSource, PoolSpec, WanConfig
    from dualparal_core.pool import WorkerPool

    spec = PoolSpec(ModelSource(random_config=WanConfig.tiny(num_layers=max(3, len(devices)))), devices=devices,
                    dtype="fp32" if dtype == torch.float32 else "bf16", compile=False)
    pool = WorkerPool.start(spec)
    try:
        spans = plan_spans(args.frames, len(devices), prime, args.min_speedup)
        # the cold pass uploads the weights and warms the kernels on a short latent (its time is not the row's)
        short = min(args.frames, 2 * len(devices))
        for attempt in ("cold", "warm"):
            zz = z[:, :, :short] if attempt == "cold" else z
            sink = sink_for(args, num_pixel_frames(zz.shape[2]), args.height, args.width, tmp)
            t0 = time.perf_counter()
            report = decode_on_pool(pool, zz, sd, sink, dtype=dtype, block_size=args.block,
                                    spans=spans if attempt == "warm" else plan_spans(short, len(devices), prime, 0))
            sink.finish()
            seconds = time.perf_counter() - t0
            peaks = [None if r.get("peak_bytes") is None else r["peak_bytes"] / GIB for r in report.ranks]
            label = f"Block Decode, {len(spans)} devices, spans {spans}"
            if attempt == "cold":
                print(f"(cold: weights upload + {short} latent frames, {seconds:.1f} s)")
            else:
                row(label, seconds, peaks, diff(sink))
    finally:
        pool.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
