"""``python -m dualparal_core bench`` on CPU: the FLOP formula against torch's own FLOP counter, the whole run (our
engine through the pool and the diffusers baseline in a process of its own) with its JSON rows, and bad flags
refused in one line before anything starts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from dualparal_core.__main__ import main
from dualparal_core.bench.flops import block_step_flops, item_flops
from dualparal_core.config import BlockLayout, WanConfig


def test_block_step_flops_equal_torchs_flop_counter():
    """An independent count: torch.utils.flop_counter over one block-step of a two-layer stage, with right-context
    K/V and a window that keeps K/V for its neighbour. The math SDPA kernel is pinned because FlopCounterMode counts
    its bmm's (it has no formula for the CPU flash kernel); the text K/V are made before counting (once per job)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dualparal_core.model import WanStage

    cfg = WanConfig(dim=256, ffn_dim=384, num_layers=2, num_heads=2, text_dim=64, freq_dim=32)
    stage = WanStage(cfg, range(2), embed=False, head=True, attention_backend="sdpa_math")
    stage.init_random(0)
    b, frames, gh, gw, text_tokens = 2, 3, 2, 4, 7
    lq, r = frames * gh * gw, gh * gw  # one frame of right context
    g = torch.Generator().manual_seed(0)
    text = stage.prepare_text(torch.randn(b, text_tokens, cfg.text_dim, generator=g))
    h, tproj = torch.randn(b, lq, cfg.dim, generator=g), torch.randn(b, 6, cfg.dim, generator=g)
    right = {i: (torch.randn(b, r, cfg.dim, generator=g), torch.randn(b, r, cfg.dim, generator=g)) for i in range(2)}
    with FlopCounterMode(display=False) as counter:
        stage.blocks_forward(h, tproj, text, (frames, gh, gw), right=dict(right), keep=(0, r))
    assert counter.get_total_flops() == block_step_flops(cfg, lq, lq + r, b, text=text_tokens)
    # the stage with the head, told its window's own frames start at frame 1: the last layer's queries are those
    with FlopCounterMode(display=False) as counter:
        out, _ = stage.blocks_forward(h, tproj, text, (frames, gh, gw), right=dict(right), keep=(0, r), out_from=r)
    assert out.shape[1] == lq - r
    assert counter.get_total_flops() == block_step_flops(cfg, lq, lq + r, b, text=text_tokens, own=lq - r)
    assert block_step_flops(cfg, lq, lq + r, b, text=text_tokens, own=lq - r) < block_step_flops(cfg, lq, lq + r, b,
                                                                                                  text=text_tokens)
    # and the schedule's per-item counts use the window and right context of each block-step
    layout = BlockLayout(7, 2, 2)
    per_item = item_flops(cfg, layout, 2, gh * gw, b)
    assert len(per_item) == layout.num_blocks * 2 and min(per_item) < max(per_item)


def test_bench_runs_ours_and_the_baseline_on_cpu(tmp_path, capsys, no_leftover_workers):
    out = tmp_path / "rows.json"
    code = main(["bench", "--model", "tiny", "--devices", "cpu", "--frames", "6", "--steps", "2", "--height", "32",
                 "--width", "32", "--num-per-block", "2", "--num-cat", "1", "--attention", "sdpa", "sdpa_math",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["P"] == 2 and data["K"] == 1 and data["steps"] == 2
    rows = {r["kind"]: r for r in data["rows"]}
    assert set(rows) == {"ours", "ours-sdpa_math", "fullseq-sdpa"}
    # a second backend is a row of its own pool, compared with the first on the same job: the same maths in another
    # kernel, so the final latents agree to float32 rounding (1e-4 leaves room for its order of summation)
    math_row = rows.pop("ours-sdpa_math")
    assert math_row["attention"] == "sdpa_math" and 0 <= math_row["latent_rel_err"] < 1e-4
    tpf = (32 // 16) * (32 // 16)
    for kind, r in rows.items():
        for key in ("name", "gpus", "frames", "video_frames", "seconds", "block_steps", "flops",
                    "flops_per_block_step", "ms_per_block_step", "tflops_per_gpu", "peak_gib", "time_vs_ours"):
            assert key in r, (kind, key)
        assert r["frames"] == 6 and r["video_frames"] == 21 and r["seconds"] > 0 and r["gpus"] == 1
        assert r["tflops_per_gpu"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)
    ours, base = rows["ours"], rows["fullseq-sdpa"]
    assert ours["block_steps"] == BlockLayout(6, 2, 1).num_blocks * 2 and ours["time_vs_ours"] == 1.0
    assert base["block_steps"] == 2  # the whole video per step
    assert base["flops_per_block_step"] == block_step_flops(WanConfig.tiny(num_layers=4), 6 * tpf, 6 * tpf, 2)
    assert base["finite"] and base["time_vs_ours"] == pytest.approx(base["seconds"] / ours["seconds"])
    table = text[text.index("| setting |"):].splitlines()
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| ours N=1 sdpa", "| ours N=1 sdpa_math",
                                                             "| full-sequence diffusers SDPA"]


BAD = [
    (["--num-cat", "9"], "--num-cat=9"),
    (["--frames", "72", "0"], "--frames=0"),
    (["--width", "830"], "--width=830"),
    (["--steps", "0"], "--steps=0"),
    (["--baseline-steps", "11"], "--baseline-steps=11"),
    (["--devices", "cuda:3"], "--devices='cuda:3'"),
    (["--devices", "cpu:9"], "--devices='cpu:9'"),  # the tiny model has 4 layers
    (["--ulysses"], "--ulysses=True"),
    (["--baseline-attention", "fa3"], "--baseline-attention='fa3'"),
    (["--attention", "flash9"], "--attention='flash9'"),
    (["--reference", "/nonexistent/DualParal"], "--reference='/nonexistent/DualParal'"),
    (["--json", "/tmp"], "--json='/tmp'"),
    (["--attention", "sdpa", "sdpa_math", "--matmul", "bf16", "fp8", "fp8"], "--matmul='bf16 fp8 fp8'"),
]


@pytest.mark.parametrize("flags,named", BAD, ids=[b[0][0] for b in BAD])
def test_bad_flags_are_refused_in_one_line_before_anything_starts(flags, named, monkeypatch, capsys):
    def started(*a, **kw):
        raise AssertionError("a process was started for a refused flag")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # whatever this machine has, the flags see no GPU
    monkeypatch.setattr(subprocess, "Popen", started)
    monkeypatch.setattr("dualparal_core.pool.WorkerPool.start", started)
    code = main(["bench", "--model", "tiny", "--devices", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and named in err, err


def test_an_unknown_model_is_refused_by_the_parser_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "7b"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--model: invalid choice: '7b'" in err, err


def test_a_folder_that_is_no_dualparal_checkout_is_named(tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--devices", "cpu", "--reference", str(tmp_path)]) == 2
    assert "lacks examples/DualParal_Wan.py" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("DUALPARAL_REFERENCE"), reason="set DUALPARAL_REFERENCE to a checkout of "
                                                                      "DualParal-Project/DualParal")
def test_the_published_pipeline_runs_its_block_steps_on_our_stand_in():
    """Our stand-in for the published example's prepare_model, against the checkout's own pipeline code and this
    diffusers, without NCCL: a one-GPU block-step, then two ranks' halves of a block-step pair as its main calls
    them (the newer block first, leaving the K/V cache that the older one reads), with the shapes its main expects."""
    import types

    from dualparal_core.bench import reference as ref

    mod = ref.load_example(os.environ["DUALPARAL_REFERENCE"])
    P, K, C = 2, 1, 16

    def pipe(rank: int, world: int):
        args = _example_args(mod, ref)
        pc = types.SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"))
        p, _ = ref.prepare_model(mod, WanConfig.tiny(num_layers=2), args, pc, mod.RuntimeConfig(0, "fp32"))
        p.get_model_args(prompt="a", negative_prompt="b", num_inference_steps=3, guidance_scale=5.0)
        return p, args

    one, args = pipe(0, 1)
    blk = types.SimpleNamespace(z=torch.randn(1, C, P + K, args.height, args.width), denoise_time=0)
    assert one.onestep(blk, latent_size=blk.z.size()).shape == (1, C, P + K, 4, 4)
    assert len(one.timesteps) == 3 and one.scheduler.config.solver_type == "bh2"
    first, last = pipe(0, 2)[0], pipe(1, 2)[0]
    tokens = first.onestep(types.SimpleNamespace(z=torch.randn(1, C, P, 4, 4), denoise_time=0),
                           latent_size=(1, C, P, 4, 4)).shape[1]  # its warm-up: Block_latents_size[1]
    for stage in (first, last):
        stage.cache, x = [], None
        for frames in (P + K, P + K):  # the newer block (no cache yet), then the older one (with its cache)
            z = torch.randn(1, C, frames, 4, 4) if stage is first else torch.randn(2, frames * 4, 128)
            out = stage.onestep(types.SimpleNamespace(z=z, denoise_time=1), latent_size=(1, C, frames, 4, 4),
                                latent_num=tokens, select=K, select_all=P)
            x = out if x is None else x
        assert len(stage.cache) == 1  # one K/V cache per layer of its half (one of two)
    assert x.shape == (1, C, P + K, 4, 4) and out.shape == (1, C, P + K, 4, 4)


def _example_args(mod, ref):
    import sys

    spec = dict(dtype="fp32", height=32, width=32, steps=3, shift=3.0, cfg=5.0, P=2, K=1, frames=4)
    argv, sys.argv = sys.argv, ref.example_argv(spec, "/tmp/unused")
    try:
        return mod._parse_args()
    finally:
        sys.argv = argv


def test_the_fa3_baseline_sends_diffusers_attention_to_the_fa3_function(monkeypatch):
    """The FA3 baseline row's routing, with a stand-in ``fa3_fwd_interface`` (the real one needs a Hopper GPU) that
    computes attention in FA3's [B, L, H, d] layout: diffusers' forward calls it (self- and cross-attention of every
    layer) and gives what plain SDPA gives."""
    import sys
    import types

    import torch.nn.functional as F

    from dualparal_core.bench import fullseq

    plain = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", plain)  # restored after the test
    fake = types.ModuleType("fa3_fwd_interface")
    fake.flash_attn_func = lambda q, k, v: plain(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", fake)
    cfg = WanConfig.tiny(num_layers=2)
    model = fullseq.build_model(cfg, "bf16", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(2, 5, cfg.text_dim, generator=g).bfloat16()
    want = fullseq.sample(model, x, ctx, (1.0, 0.5), 5.0)
    count = fullseq.route_sdpa_to_fa3()
    got = fullseq.sample(model, x, ctx, (1.0, 0.5), 5.0)
    assert count == {"fa3": 4, "sdpa": 0}  # 2 layers x (self + cross)
    assert torch.equal(got, want)  # the same kernel underneath: our routing changes nothing else


def test_a_failed_or_late_peer_becomes_a_row_that_says_why(tmp_path):
    """runner.merge: the slowest rank's time and the largest peak of a peer's ranks; a rank's error, a rank gone
    without a result, or the timeout named instead."""
    from dualparal_core.bench.runner import merge

    log = tmp_path / "x.log"
    ok = [dict(seconds=2.0, peak_gib=3.0, reserved_gib=4.0, device_name="d"),
          dict(seconds=2.5, peak_gib=2.0, reserved_gib=5.0, device_name="d")]
    got = merge(ok, False, 9, log)
    assert (got["seconds"], got["peak_gib"], got["reserved_gib"], got["peak_per_rank"]) == (2.5, 3.0, 5.0, [3.0, 2.0])
    assert merge([ok[0], dict(error="RuntimeError: boom")], False, 9, log)["error"].startswith("RuntimeError: boom")
    assert "without a result" in merge([ok[0], None], False, 9, log)["error"]
    assert merge(ok, True, 9, log)["error"].startswith("timed out after 9 s")


def test_fp8_gemms_are_a_row_of_their_own_compared_with_the_first(tmp_path, capsys, no_leftover_workers):
    out = tmp_path / "rows.json"
    code = main(["bench", "--model", "tiny", "--devices", "cpu", "--frames", "6", "--steps", "2", "--height", "32",
                 "--width", "32", "--num-per-block", "2", "--num-cat", "1", "--attention", "sdpa", "sdpa_math",
                 "--matmul", "bf16", "fp8", "--no-baseline", "--json", str(out)])  # paired up: two rows
    text = capsys.readouterr().out
    assert code == 0, text
    rows = {r["kind"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ours", "ours-sdpa_math-fp8-GEMM"} and rows["ours"]["matmul"] == "bf16"
    fp8 = rows["ours-sdpa_math-fp8-GEMM"]
    # the same job with every block GEMM's operands rounded to e4m3 (~3.6 % per GEMM output, tests/test_fp8_gemm.py;
    # the residual stream carries most of the signal; sdpa_math alone moves it by ~1e-7): the latents move, far
    # less than another model would (measured 1.1e-3)
    assert fp8["matmul"] == "fp8" and fp8["attention"] == "sdpa_math" and 1e-5 < fp8["latent_rel_err"] < 1e-2
    assert "ours N=1 sdpa_math fp8 GEMM" in text and "final latents' relative error against ours" in text


def test_fp8_gemms_on_a_gpu_in_fp16_are_refused_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setattr("dualparal_core.headless.checks.cli_devices", lambda text: ("cuda:0",))
    monkeypatch.setattr("dualparal_core.pool.WorkerPool.start", lambda *a, **kw: pytest.fail("a pool was started"))
    assert main(["bench", "--model", "tiny", "--devices", "0", "--dtype", "fp16", "--matmul", "bf16", "fp8",
                 "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--matmul='fp8'" in err and "--dtype bf16" in err, err
