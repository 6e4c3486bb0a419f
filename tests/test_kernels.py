"""The hand-written kernels (dualparal_core/kernels.py: qk-norm + RoPE, the LayerNorm chains) against the torch
chains they replace (chains.py) evaluated in float64: on a GPU in bf16 (the GPU tier), and on CPU through Triton's interpreter
where Triton is installed (PyTorch's CPU wheels do not ship it: CI skips that one, saying so)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dualparal_core.chains import rope_qk
from dualparal_core.config import WanConfig
from dualparal_core.model import rope_tables

HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = torch.cuda.is_available()


def _inputs(device, dtype, heads: int = 3, frames: int = 3, right: int = 2, h: int = 2, w: int = 3):
    """A fused-QKV-like slice (row stride 3·D: the layout the kernel reads in the engine), right-context keys, a
    norm weight and the window's RoPE tables."""
    cfg = WanConfig.tiny(dim=128 * heads)
    g = torch.Generator().manual_seed(0)
    L, D = frames * h * w, cfg.dim
    qkv = (torch.randn(2, L, 3 * D, generator=g) * 3).to(device, dtype)
    rk = (torch.randn(2, right * h * w, D, generator=g) * 3).to(device, dtype)
    wt = (1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype)
    cos, sin = rope_tables(cfg, frames + right, h, w, device)
    return cfg, qkv[..., D:2 * D], rk, wt, cos, sin, L


def _check(device, dtype, tol):
    from dualparal_core.kernels import rms_rope

    cfg, k, rk, wt, cos, sin, L = _inputs(device, dtype)
    ref = rope_qk(k.double(), wt.double(), 1e-6, cfg.num_heads, cos.double(), sin.double(), rk.double())
    got = rms_rope(k, wt, 1e-6, cfg.num_heads, cos, sin, rk)
    assert got.shape == ref.shape == (2, cfg.num_heads, k.shape[1] + rk.shape[1], 128) and got.dtype == dtype
    err = (got.double() - ref).abs().max().item()
    assert err <= tol, err
    q = rms_rope(k, wt, 1e-6, cfg.num_heads, cos[:, :L], sin[:, :L])  # no right context (the queries' call)
    torch.testing.assert_close(q.double(), ref[:, :, :L], rtol=0, atol=tol)
    return err, ref, k, rk, wt, cos, sin, cfg


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (it ships with PyTorch's CUDA wheels, not its CPU ones)")
def test_the_kernel_computes_the_torch_chain_in_triton_s_interpreter(monkeypatch):
    """float32 on CPU: the kernel does the chain's arithmetic in float32 throughout, so it is within float32's
    rounding (a few 1e-7 on values of order 1 to 10) of the float64 chain."""
    from dualparal_core import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is built: build it afresh
    monkeypatch.setattr(kernels, "_KERNEL", None)
    _check("cpu", torch.float32, 5e-6)


def _check_layer_norms(device, dtype, tol):
    """modulate / add_modulate / affine_norm on a non-contiguous slice of h (the trimmed last layer's rows), with
    the modulation's shift and scale as chunks of one [b, 6, D] float32 table, against float64 torch chains; the
    torch chains in ``dtype`` are returned for the caller's comparison."""
    from dualparal_core import chains, kernels

    g = torch.Generator().manual_seed(2)
    b, L, D = 2, 21, 384
    h = (torch.randn(b, L + 3, D, generator=g) * 3).to(device, dtype)[:, 3:]
    o = torch.randn(b, L, D, generator=g).to(device, dtype)
    shift, scale = (torch.randn(b, 6, D, generator=g) * 0.5).to(device).chunk(6, dim=1)[:2]
    w, bias = (1 + 0.1 * torch.randn(D, generator=g)).to(device), (0.1 * torch.randn(D, generator=g)).to(device)
    d64 = lambda *ts: [t.double() for t in ts]  # noqa: E731
    pairs = [(kernels.modulate(h, shift, scale, 1e-6), chains.modulate(*d64(h, shift, scale), 1e-6),
              chains.modulate(h, shift, scale, 1e-6)),
             (kernels.affine_norm(h, w, bias, 1e-6), chains.affine_norm(*d64(h, w, bias), 1e-6),
              chains.affine_norm(h, w, bias, 1e-6))]
    (kh, kx), (th, tx) = kernels.add_modulate(h, o, shift, scale, 1e-6), chains.add_modulate(h, o, shift, scale,
                                                                                             1e-6)
    assert torch.equal(kh, th)  # the residual sum is rounded to the compute dtype, as the torch chain rounds it
    pairs.append((kx, chains.modulate(*d64(kh, shift, scale), 1e-6), tx))  # its norm, from the rounded sum
    for got, ref, _ in pairs:
        assert got.dtype == dtype and got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() <= tol
    return pairs


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (see above)")
def test_the_layer_norm_kernels_compute_the_torch_chains_in_triton_s_interpreter(monkeypatch):
    from dualparal_core import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_KERNEL", None)
    _check_layer_norms("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or not HAS_TRITON, reason="needs a CUDA GPU with Triton (device machine only)")
def test_on_a_gpu_the_layer_norm_kernels_are_within_one_bf16_rounding_of_float64():
    """Each output is rounded once to bf16 (relative 2**-9) from float32 arithmetic; values of order 10 after the
    modulation: at most a few hundredths, and no worse than the torch chains in bf16 plus one rounding step."""
    for got, ref, torch_bf16 in _check_layer_norms("cuda", torch.bfloat16, 0.1):
        torch_err = (torch_bf16.double() - ref).abs().max().item()
        assert (got.double() - ref).abs().max().item() <= torch_err + ref.abs().max().item() * 2**-8


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or not HAS_TRITON, reason="needs a CUDA GPU with Triton (device machine only)")
def test_on_a_gpu_the_kernel_is_at_least_as_close_to_float64_as_the_torch_chain_in_bf16():
    """bf16: the torch chain rounds twice (after the norm, after the rotation), the kernel once; both against the
    float64 chain, the kernel's largest error may not exceed the torch chain's."""
    err, ref, k, rk, wt, cos, sin, cfg = _check("cuda", torch.bfloat16, 0.1)
    torch_err = (rope_qk(k, wt, 1e-6, cfg.num_heads, cos, sin, rk).double() - ref).abs().max().item()
    assert err <= torch_err, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or not HAS_TRITON, reason="needs a CUDA GPU with Triton (device machine only)")
def test_a_compiled_gpu_stage_uses_the_kernel_and_stays_within_bf16_of_the_torch_chains():
    from dualparal_core import kernels
    from dualparal_core.model import WanStage

    cfg = WanConfig.tiny(dim=256, num_layers=2)
    st = WanStage(cfg, range(2), embed=True, head=True, dtype=torch.bfloat16, device="cuda")
    st.init_random(0)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4 * 12, cfg.dim, generator=g).to("cuda", torch.bfloat16)
    tp, _ = st.time_embed(torch.full((2,), 640.0))
    text = st.prepare_text(torch.randn(2, 9, cfg.text_dim, generator=g).to("cuda"))
    want, cache = st.blocks_forward(h, tp, text, (4, 3, 4), keep=(24, 24))
    want_r, _ = st.blocks_forward(h, tp, text, (4, 3, 4), right=cache)
    os.environ.pop("DUALPARAL_TRITON", None)
    st.compile_elementwise()
    assert st._ew["rope_qk"] is kernels.rms_rope and st._ew["add_modulate"] is kernels.add_modulate
    got, cache = st.blocks_forward(h, tp, text, (4, 3, 4), keep=(24, 24))
    got_r, _ = st.blocks_forward(h, tp, text, (4, 3, 4), right=cache, out_from=24)  # the head stage's own rows
    want_r = want_r[:, 24:]
    for a, b in ((got, want), (got_r, want_r)):  # bf16 chains rounded in other places: a few 2**-8
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        assert rel < 2e-2, rel
