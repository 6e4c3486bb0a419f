"""Attention backends: which ones exist, what ``auto`` picks on which device, the error for a missing one (before any
process starts), and that the FlashAttention-3 path hands the kernel its [B, L, H, d] layout and returns ours."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from fault_helpers import tiny_spec

from dualparal_core import attention as attn
from dualparal_core.config import ATTENTION_BACKENDS, ModelSource, PoolSpec, WanConfig


def test_the_backends_and_bad_names():
    assert ATTENTION_BACKENDS[:3] == ("auto", "sdpa", "fa3")
    with pytest.raises(ValueError, match=r"attention='bogus' is not supported; choose one of \['auto'"):
        attn.check_backend("bogus")
    with pytest.raises(ValueError, match="attention='bogus'"):
        PoolSpec(ModelSource(random_config=WanConfig.tiny()), devices=("cpu",), attention="bogus")


def test_a_missing_fa3_names_the_package(monkeypatch):
    monkeypatch.setattr(attn, "fa3_available", lambda: False)
    with pytest.raises(ValueError, match=r"attention='fa3' needs FlashAttention-3.*pip install fa3-fwd==0\.0\.3"):
        attn.check_backend("fa3")


def test_a_missing_fa3_is_refused_before_any_rank_starts(monkeypatch):
    from dualparal_core import pool as pool_mod

    def no_spawn(*a, **k):
        raise AssertionError("a rank was started although attention='fa3' cannot run")

    monkeypatch.setattr(pool_mod._Spawner, "popen", no_spawn)
    monkeypatch.setattr(attn, "fa3_available", lambda: False)
    with pytest.raises(ValueError, match="fa3-fwd"):
        pool_mod.WorkerPool.start(tiny_spec(1, attention="fa3"))


@pytest.mark.parametrize(("device", "capability", "dtype", "installed", "want"), [
    ("cpu", None, torch.float32, True, "sdpa"),
    ("cpu", None, torch.bfloat16, True, "sdpa"),
    ("cuda", (9, 0), torch.bfloat16, True, "fa3"),  # H100 / H200
    ("cuda", (9, 0), torch.bfloat16, False, "sdpa"),  # the wheel is not installed: fall back, say so
    ("cuda", (9, 0), torch.float32, True, "sdpa"),  # FA3 has no fp32 kernels
    ("cuda", (8, 0), torch.bfloat16, True, "sdpa"),  # A100: FA3 is Hopper-only
])
def test_auto_picks_by_device_dtype_and_what_is_installed(monkeypatch, device, capability, dtype, installed, want):
    monkeypatch.setattr(attn, "fa3_available", lambda: installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    assert attn.resolve_backend("auto", torch.device(device, 0) if device == "cuda" else torch.device(device),
                                dtype) == want
    assert attn.resolve_backend("sdpa_math", torch.device("cpu"), dtype) == "sdpa_math"  # explicit: kept


def test_an_explicit_fa3_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(attn, "fa3_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    for device, dtype in ((torch.device("cpu"), torch.bfloat16), (torch.device("cuda", 0), torch.bfloat16)):
        with pytest.raises(ValueError, match=r"attention='fa3' runs on Hopper GPUs .*choose 'auto' or 'sdpa'"):
            attn.resolve_backend("fa3", device, dtype)


def test_the_fa3_path_passes_its_layout_and_returns_ours(monkeypatch):
    """A stand-in kernel that only accepts FA3's [B, L, H, d]: our [B, H, L, d] goes in transposed, comes back."""
    calls = []

    def flash_attn_func(q, k, v):
        b, lq, h, d = q.shape
        assert k.shape[1] == v.shape[1] != lq and k.shape[2] == h, "not FA3's [batch, seqlen, heads, headdim]"
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(sys.modules, attn.FA3_MODULE, types.SimpleNamespace(flash_attn_func=flash_attn_func))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    out = attn.attention(q, k, v, "fa3")
    assert calls == [torch.Size([2, 5, 3, 8])] and out.shape == q.shape
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # same kernel underneath: same bits
    for name in ("auto", "sdpa", "sdpa_math"):
        torch.testing.assert_close(attn.attention(q, k, v, name), out, rtol=1e-6, atol=1e-6)  # float32 reorder


def test_fp8_per_head_scales_each_head_onto_e4m3s_range():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, 16, generator=g) * torch.tensor([0.01, 1.0, 300.0]).view(1, 3, 1, 1)
    x8, descale = attn.fp8_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 3)
    # every head uses the top of e4m3's range, whatever its own magnitude
    assert torch.equal(x8.float().abs().amax(dim=(2, 3)), torch.full((2, 3), attn.E4M3_MAX))
    back = x8.float() * descale[:, :, None, None]
    # e4m3 keeps 3 mantissa bits: a rounding error of at most 2^-4 of each value (relative), far from denormals
    err = ((back - x).norm(dim=(2, 3)) / x.norm(dim=(2, 3))).max()
    assert err < 2 ** -4, err


def test_the_fa3_fp8_path_sends_fp8_with_descales_and_keeps_the_text_in_bf16(monkeypatch):
    """A stand-in FA3 that dequantises with the descales it is given and runs SDPA: the result is attention of
    the fp8-rounded inputs, within fp8's error of the exact one; the cross-attention backend stays bf16 FA3."""
    seen = []

    def flash_attn_func(q, k, v, q_descale=None, k_descale=None, v_descale=None):
        seen.append((q.dtype, k.dtype, v.dtype, tuple(q_descale.shape), tuple(k_descale.shape)))
        deq = [t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq)).transpose(1, 2)
        return out.to(torch.bfloat16)

    monkeypatch.setitem(sys.modules, attn.FA3_MODULE, types.SimpleNamespace(flash_attn_func=flash_attn_func))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (24, 40, 40))
    out = attn.attention(q, k, v, "fa3_fp8")
    f8 = torch.float8_e4m3fn
    assert seen == [(f8, f8, f8, (2, 3), (2, 3))] and out.shape == q.shape
    exact = F.scaled_dot_product_attention(q, k, v)
    err = ((out.float() - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.08, err  # not the exact path, and within e4m3's rounding (2^-4 per value, averaged)
    assert attn.cross_backend("fa3_fp8") == "fa3" and attn.cross_backend("sdpa") == "sdpa"
