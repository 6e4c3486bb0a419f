"""Hand-written GPU kernels (Triton) for the block-step's memory-bound chains where torch.compile's kernels fall far
short of the memory bandwidth (docs/performance.md, "Where a block-step's time goes").

:func:`rms_rope` is :func:`dualparal_core.chains.rope_qk` in one pass: Wan's RMSNorm across heads, the rotary
embedding, and (for the keys) the right context appended, reading each input value once and writing each output
value once. Measured at S1's shape on one H100, Inductor's kernels for the same chain took about 1.2 ms per layer
for q and k together (five kernels, a separate one for the interleaving stack), about a fifth of the bandwidth.

:func:`modulate`, :func:`add_modulate` and :func:`affine_norm` are the LayerNorm chains of the same names in
chains.py (adaLN modulation, the cross-attention's residual + the FFN's modulation, the cross-attention's affine
norm), one pass each: Inductor's reduction kernels for them moved 1.2 to 1.8 TB/s at S1's shape on an H100.

Used on CUDA ranks when Triton imports (:func:`available`); CPU ranks and the tests' references run the torch
version in model.py. The kernel has one launch configuration (no autotuning): the same bits on every GPU of a
kind, so N GPUs still give the same latents as one. It rounds once, at the end (the torch version rounds the
normalised values to the compute dtype before the rotation): the two differ by the compute dtype's rounding.
The LayerNorm chains round where the torch versions do (the residual sum to the compute dtype, the result).
"""

from __future__ import annotations

import importlib.util

import torch


def available() -> bool:
    """Whether Triton is installed here (it ships with PyTorch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


_KERNEL = None  # (rms_rope_kernel, next_power_of_2, ln_kernel), built on first use


def _kernel():
    """The Triton kernels, built on first use (Triton is imported only where it is used)."""
    global _KERNEL
    if _KERNEL is None:
        import triton

        _KERNEL = (_build_rms_rope(), triton.next_power_of_2, _build_layer_norm())
    return _KERNEL


def _build_rms_rope():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_rope_kernel(x_ptr, r_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, L, sxb, sxl, srb, srl, eps,
                        D: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr):
        # one program per token row (batch b, position t of the window's L tokens then the R right-context ones)
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        p = tl.arange(0, BLOCK)  # pair index: elements 2p and 2p + 1 rotate together
        m = p < D // 2
        if t < L:
            row = x_ptr + b * sxb + t * sxl
        else:
            row = r_ptr + b * srb + (t - L) * srl
        e = tl.load(row + 2 * p, mask=m, other=0.0).to(tl.float32)
        o = tl.load(row + 2 * p + 1, mask=m, other=0.0).to(tl.float32)
        rs = 1.0 / tl.sqrt((tl.sum(e * e, axis=0) + tl.sum(o * o, axis=0)) / D + eps)
        e = e * rs * tl.load(w_ptr + 2 * p, mask=m, other=0.0).to(tl.float32)
        o = o * rs * tl.load(w_ptr + 2 * p + 1, mask=m, other=0.0).to(tl.float32)
        j = p % HALF_HEAD  # the angle index within the head (every head rotates alike)
        c = tl.load(cos_ptr + t * HALF_HEAD + j, mask=m, other=0.0)
        s = tl.load(sin_ptr + t * HALF_HEAD + j, mask=m, other=0.0)
        out = out_ptr + pid * D
        tl.store(out + 2 * p, (e * c - o * s).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out + 2 * p + 1, (e * s + o * c).to(out_ptr.dtype.element_ty), mask=m)

    return rms_rope_kernel


def _build_layer_norm():
    import triton
    import triton.language as tl

    @triton.jit
    def ln_kernel(h_ptr, o_ptr, hout_ptr, x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, L, shb, shl, sob, sol, smb, eps,
                  D: tl.constexpr, BLOCK: tl.constexpr, HAS_O: tl.constexpr, AFFINE: tl.constexpr,
                  MOD: tl.constexpr):
        # one program per token row: [h + o, rounded and stored] -> LayerNorm in float32 -> [affine] -> [adaLN]
        pid = tl.program_id(0).to(tl.int64)
        b = pid // L
        t = pid % L
        c = tl.arange(0, BLOCK)
        m = c < D
        v = tl.load(h_ptr + b * shb + t * shl + c, mask=m, other=0.0).to(tl.float32)
        if HAS_O:  # the residual sum, in the compute dtype as the torch chain keeps it
            v = (v + tl.load(o_ptr + b * sob + t * sol + c, mask=m, other=0.0).to(tl.float32))
            v = v.to(hout_ptr.dtype.element_ty)
            tl.store(hout_ptr + pid * D + c, v, mask=m)
            v = v.to(tl.float32)
        mean = tl.sum(v, axis=0) / D
        d = tl.where(m, v - mean, 0.0)
        y = d / tl.sqrt(tl.sum(d * d, axis=0) / D + eps)
        if AFFINE:
            y = y * tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32) + tl.load(b_ptr + c, mask=m,
                                                                                    other=0.0).to(tl.float32)
        if MOD:
            y = y * (1.0 + tl.load(scale_ptr + b * smb + c, mask=m, other=0.0)) + tl.load(shift_ptr + b * smb + c,
                                                                                          mask=m, other=0.0)
        tl.store(x_ptr + pid * D + c, y.to(x_ptr.dtype.element_ty), mask=m)

    return ln_kernel


def rms_rope(x: torch.Tensor, norm_w: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor,
             right: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dualparal_core.chains.rope_qk` in one kernel: x [b, L, D] (last dim contiguous, e.g. a slice of the
    fused QKV output), ``right`` [b, R, D] raw keys appended after it, cos/sin [1, >= L + R, 1, head_dim / 2]
    float32 -> [b, heads, L + R, head_dim] (a view of a [b, L + R, D] tensor)."""
    kernel, pow2, _ = _kernel()
    b, L, D = x.shape
    r = x if right is None else right
    T = L + (0 if right is None else right.shape[1])
    half = cos.shape[-1]
    if x.stride(-1) != 1 or r.stride(-1) != 1 or D != 2 * half * heads or cos.shape[1] < T:
        raise ValueError(f"rms_rope: x {tuple(x.shape)} (strides {x.stride()}), right "
                         f"{None if right is None else (tuple(right.shape), right.stride())}, heads {heads}, cos "
                         f"{tuple(cos.shape)} for {T} tokens do not fit the kernel (contiguous last dims, D = heads x "
                         f"head_dim, a table row per token); DUALPARAL_TRITON=0 runs the compiled torch chain.")
    out = torch.empty(b, T, D, dtype=x.dtype, device=x.device)
    cs = cos.reshape(-1, half)
    sn = sin.reshape(-1, half)
    kernel[(b * T,)](x, r, norm_w, cs, sn, out, T, L, x.stride(0), x.stride(1), r.stride(0), r.stride(1),
                     float(eps), D=D, HALF_HEAD=half, BLOCK=pow2(D // 2), num_warps=4)
    return out.view(b, T, heads, D // heads).transpose(1, 2)


def _layer_norm(h, o, shift, scale, weight, bias, eps) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h + o or None, the normalised rows) through one launch of the LayerNorm kernel."""
    _, pow2, kernel = _kernel()
    b, L, D = h.shape
    if h.stride(-1) != 1 or (o is not None and (o.shape != h.shape or o.stride(-1) != 1)):
        raise ValueError(f"LayerNorm kernel: h {tuple(h.shape)} (strides {h.stride()}) / o "
                         f"{None if o is None else (tuple(o.shape), o.stride())} need equal shapes with a contiguous "
                         f"last dim; DUALPARAL_TRITON=0 runs the compiled torch chain.")
    if shift is not None and (shift.dtype != torch.float32 or shift.stride() != scale.stride()
                              or shift.stride(-1) != 1):
        raise ValueError(f"LayerNorm kernel: shift ({shift.dtype}, strides {shift.stride()}) and scale ("
                         f"{scale.dtype}, strides {scale.stride()}) must be float32 views with the same strides.")
    x = torch.empty(b, L, D, dtype=h.dtype, device=h.device)
    hout = torch.empty_like(x) if o is not None else None
    dummy = h
    kernel[(b * L,)](h, dummy if o is None else o, x if hout is None else hout, x,
                     dummy if shift is None else shift, dummy if scale is None else scale,
                     dummy if weight is None else weight, dummy if bias is None else bias,
                     L, h.stride(0), h.stride(1), *((0, 0) if o is None else (o.stride(0), o.stride(1))),
                     0 if shift is None else shift.stride(0), float(eps), D=D, BLOCK=pow2(D),
                     HAS_O=o is not None, AFFINE=weight is not None, MOD=shift is not None, num_warps=8)
    return hout, x


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`dualparal_core.chains.modulate` in one pass."""
    return _layer_norm(h, None, shift, scale, None, None, eps)[1]


def add_modulate(h: torch.Tensor, o: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dualparal_core.chains.add_modulate` in one pass: (h + o, its modulated LayerNorm)."""
    return _layer_norm(h, o, shift, scale, None, None, eps)


def affine_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`dualparal_core.chains.affine_norm` in one pass."""
    return _layer_norm(h, None, None, None, weight, bias, eps)[1]
