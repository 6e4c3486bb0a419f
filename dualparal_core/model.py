"""One pipeline stage of the Wan transformer with DualParal's two-sided context attention.

The weights live in diffusers' own modules (``WanTransformerBlock``, ``WanTimeTextImageEmbedding``), so their key
names are diffusers' and a stage loads a slice of a diffusers state dict as is. The forward is ours: self-attention
can attend to a right-context K/V cache left by the next-newer block, text K/V are computed once per job, and all
attention goes through :func:`attention` whose backend is switchable.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import chains, kvcache
from .attention import attention, cross_backend
from .chains import ELEMENTWISE, feed_forward
from .conditioning import cross_attend, image_kv, project_kv
from .config import ATTENTION_BACKENDS, WanConfig
from .files import keeps_fp32


def rope_tables(config: WanConfig, frames: int, h: int, w: int, device, first_frame: int = 0):
    """RoPE cos/sin [1, frames*h*w, 1, head_dim/2] for a window of ``frames`` latent frames whose first frame has
    temporal position ``first_frame`` (positions are local to the window, never absolute in the video)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    d = config.head_dim
    hd = wd = 2 * (d // 6)
    td = d - hd - wd
    out = []
    for part in ("cos", "sin"):
        tabs = []
        for dim, n, axis in ((td, first_frame + frames, 0), (hd, h, 1), (wd, w, 2)):
            c, s = get_1d_rotary_pos_embed(dim, max(n, 1), 10000.0, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=torch.float64)
            t = (c if part == "cos" else s)
            if axis == 0:
                t = t[first_frame:first_frame + frames]
            shape = [1, 1, 1, dim]
            shape[axis] = t.shape[0]
            tabs.append(t.view(*shape).expand(frames, h, w, dim))
        full = torch.cat(tabs, dim=-1).reshape(1, frames * h * w, 1, d)
        # diffusers repeats each angle twice and reads cos[0::2], sin[1::2]: keep one of each pair
        out.append(full[..., 0::2].to(device=device, dtype=torch.float32).contiguous())
    return out[0], out[1]


@dataclass
class TextKV:
    """Cross-attention keys/values of one prompt (or blend), per layer: {layer: (k, v)} each [b, H, L_text, d], or
    {layer: ((k, v), (k, v))}, one pair per batch half, when cond and uncond differ in length. ``img``: the same
    over the image tokens for a model with the image cross-attention (Wan2.1 I2V/FLF2V), else None."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    img: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


class WanStage(nn.Module):
    """Layers ``layers`` of a Wan transformer, plus the patch embedding (``embed``) and/or the head (``head``).

    Every stage holds the time and text embedders (small) and computes them itself, so only hidden states travel.
    """

    kv_keep = staticmethod(kvcache.keep_exact)  # how the right-context K/V are kept (PoolSpec.kv_cache)

    def __init__(self, config: WanConfig, layers: range, *, embed: bool, head: bool,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attention_backend: str = "sdpa"):
        super().__init__()
        from diffusers.models.transformers.transformer_wan import (
            WanTimeTextImageEmbedding,
            WanTransformerBlock,
        )

        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention_backend!r} is not supported; "
                             f"choose one of {list(ATTENTION_BACKENDS)}.")
        if layers.start < 0 or layers.stop > config.num_layers or len(layers) < 1:
            raise ValueError(f"layers {layers} do not fit a model of {config.num_layers} layers.")
        self.config, self.layers, self.has_embed, self.has_head = config, layers, embed, head
        self.dtype, self.attention_backend = dtype, attention_backend
        c = config
        with torch.device("meta"):
            self.condition_embedder = WanTimeTextImageEmbedding(
                dim=c.dim, time_freq_dim=c.freq_dim, time_proj_dim=c.dim * 6, text_embed_dim=c.text_dim,
                image_embed_dim=c.image_dim, pos_embed_seq_len=c.image_pos_len)
            added_kv = c.dim if c.image_dim is not None else None  # I2V: k_img/v_img (add_k_proj/add_v_proj)
            self.blocks = nn.ModuleDict({
                str(i): WanTransformerBlock(c.dim, c.ffn_dim, c.num_heads, "rms_norm_across_heads",
                                            c.cross_attn_norm, c.eps, added_kv) for i in layers})
            if embed:
                self.patch_embedding = nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size,
                                                 stride=c.patch_size)
            if head:
                self.proj_out = nn.Linear(c.dim, c.out_channels * c.patch_size[0] * c.patch_size[1]
                                          * c.patch_size[2])
                self.scale_shift_table = nn.Parameter(torch.empty(1, 2, c.dim))
        self.to_empty(device=device)
        self._cast_params()
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ew = dict(ELEMENTWISE)
        self.ffn_epilogue = False  # see feed_forward; turned on with the compiled elementwise chains (GPUs)

    def rope(self, frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached RoPE tables for a window of ``frames`` frames starting at temporal position 0."""
        key = (frames, h, w)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.config, frames, h, w, self.device)
        return self._rope_cache[key]

    # ------------------------------------------------------------------ weights
    def _cast_params(self) -> None:
        for name, p in self.named_parameters():  # the loader's rule: files.KEEP_FP32
            want = torch.float32 if keeps_fp32(name) else self.dtype
            if p.dtype != want:
                p.data = p.data.to(want)

    def load_weights(self, sd: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> None:
        """Load diffusers-named weights (absolute block indices); keys of other stages are ignored.

        ``assign``: take the tensors of ``sd`` as the parameters (cast only where the dtype differs) instead of
        copying into preallocated ones: with a stage built on the meta device, the slice is in memory once.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if strict and missing:
            raise ValueError(f"Weights for layers {self.layers} are missing {len(missing)} tensors, e.g. "
                             f"{missing[:3]}; the checkpoint does not match the model shape {self.config}.")
        if assign:
            for k, p in own.items():
                if k in sd and tuple(sd[k].shape) != tuple(p.shape):
                    raise ValueError(f"Tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}.")
            self.load_state_dict({k: sd[k] if sd[k].dtype == p.dtype else sd[k].to(p.dtype)
                                  for k, p in own.items() if k in sd}, strict=False, assign=True)
            return
        with torch.no_grad():
            for k, p in own.items():
                if k in sd:
                    if tuple(sd[k].shape) != tuple(p.shape):
                        raise ValueError(f"Tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}.")
                    p.copy_(sd[k].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights, each tensor seeded by (seed, name): the same model whatever the layer split."""
        for name, p in self.named_parameters():
            g = torch.Generator(device=p.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.01)
            elif "norm" in name and p.ndim == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.1)
            else:
                s = std if p.ndim != 2 else min(std, p.shape[-1] ** -0.5)  # 2-D: at most 1/sqrt(fan-in)
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * s)

    # ------------------------------------------------------------------ per-job / per-step embeddings
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def time_embed(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [b] (sigma * 1000) -> (modulation [b, 6, dim] float32, temb [b, dim]) as diffusers computes."""
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep.to(self.device))
        t = t.to(next(ce.time_embedder.parameters()).dtype)
        temb = ce.time_embedder(t).to(self.dtype)
        tproj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        return tproj.float(), temb

    @torch.no_grad()
    def prepare_text(self, context: torch.Tensor, clip: torch.Tensor | None = None, image: bool = True) -> TextKV:
        """context [b, L, text_dim] -> per-layer cross-attention K/V, computed once per job; a model with
        ``img_emb`` also gets image K/V from the CLIP-vision tokens ``clip`` (:func:`conditioning.image_kv`), unless
        ``image`` is False (the caller brings image K/V it computed once)."""
        emb = self.condition_embedder.text_embedder(context.to(self.device, self.dtype))
        kv = {}
        for i in self.layers:
            a = self.blocks[str(i)].attn2
            kv[i] = project_kv(emb, a.to_k, a.norm_k, a.to_v, a.heads)
        return TextKV(kv, image_kv(self, emb, clip) if image else None)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, C, F, H, W] latent (normalised) -> hidden [b, F*h*w, dim]."""
        h = self.patch_embedding(x.to(self.device, self.dtype))
        return h.flatten(2).transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ transformer layers
    @torch.no_grad()
    def blocks_forward(self, h: torch.Tensor, tproj: torch.Tensor, text: TextKV, grid: tuple[int, int, int],
                       right: dict | None = None, keep: tuple[int, int] | None = None, out_from: int = 0,
                       ) -> tuple[torch.Tensor, dict | None]:
        """Run this stage's layers.

        Args:
            h: [b, L, dim] hidden states of the block's input window (left context + own frames), L = F*h*w.
            tproj: [b, 6, dim] modulation from :meth:`time_embed`.
            grid: (F, h, w) tokens of the window.
            right: {layer: entry} (kvcache.py) of the next-newer block's first frames' raw K/V [b, R, dim], or
                None; consumed layer by layer, so the old cache and the new one never both stay whole in memory.
            keep: (start, length) token range of this window whose raw K/V the older neighbour will need, or None.
            out_from: on the stage with the head, the first token the head reads (the window's own frames): the
                last layer computes the tokens before it (the left context) as keys and values only, and the
                result holds tokens ``out_from:`` only (row by row the same values).
        Returns: hidden states, and the cache {layer: entry} for the older neighbour (None if ``keep`` is None).
        """
        F_, gh, gw = grid
        r_frames = 0 if right is None else kvcache.tokens(next(iter(right.values()))) // (gh * gw)
        cos, sin = self.rope(F_ + r_frames, gh, gw)
        L = F_ * gh * gw
        cache = {} if keep is not None else None
        pace = kvcache.Pacer(h.device, kvcache.offloaded(self.kv_keep if keep is not None else None, right))
        for i in self.layers:
            pace.step()
            r = kvcache.take(right, i)
            img = None if text.img is None else text.img[i]
            trim = out_from if self.has_head and i == self.layers[-1] else 0
            h, kv = self._layer(self.blocks[str(i)], h, tproj, (text.kv[i], img), cos, sin, L, r, keep, trim)
            if cache is not None:
                cache[i] = kv
        if cache:  # offload: the next block-step's first layer need not wait for its context to come back
            kvcache.prefetch(next(iter(cache.values())))
        return h, cache

    def _layer(self, blk, h, tproj, text_kv, cos, sin, L, right, keep, trim=0):
        ew, eps = self._ew, self.config.eps
        shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table + tproj).chunk(6, dim=1)
        x = ew["modulate"](h, shift, scale, eps)
        a = blk.attn1
        if hasattr(a, "to_qkv"):  # fused projection (see fuse_qkv)
            q, k, v = a.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
        saved = None
        if keep is not None:
            s, n = keep
            saved = self.kv_keep(k[:, s:s + n], v[:, s:s + n])
        rk = None
        if right is not None:
            rk, rv = kvcache.load(right, v.dtype)
            v = ew["cat_tokens"](v, rv)
        lk = v.shape[1]
        q = ew["rope_qk"](q[:, trim:], a.norm_q.weight, a.norm_q.eps, a.heads, cos[:, trim:L], sin[:, trim:L])
        k = ew["rope_qk"](k, a.norm_k.weight, a.norm_k.eps, a.heads, cos[:, :lk], sin[:, :lk], rk)
        v = v.unflatten(2, (a.heads, -1)).transpose(1, 2)
        o = attention(q, k, v, self.attention_backend)
        o = a.to_out[0](o.transpose(1, 2).flatten(2))
        h = ew["gated_residual"](h[:, trim:] if trim else h, o, gate)  # from here on, the queries' tokens only
        # cross-attention with the job's precomputed text K/V (norm2 is an affine fp32 LayerNorm, or none)
        n2 = blk.norm2
        x = h if isinstance(n2, nn.Identity) else ew["affine_norm"](h, n2.weight, n2.bias, n2.eps)
        c = blk.attn2
        q = ew["rms_heads"](c.to_q(x), c.norm_q.weight, c.norm_q.eps, c.heads)
        (tk, img_kv), be = text_kv, cross_backend(self.attention_backend)
        o = cross_attend(q, tk, be)
        if img_kv is not None:  # I2V: text and image attention summed before the output projection
            o = o + cross_attend(q, img_kv, be)
        h, x = ew["add_modulate"](h, c.to_out[0](o.transpose(1, 2).flatten(2)), c_shift, c_scale, eps)
        h = ew["gated_residual"](h, feed_forward(blk.ffn, x, self.ffn_epilogue), c_gate)
        return h, saved

    # ------------------------------------------------------------------ speed-ups applied after loading
    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Replace each self-attention's three projections by one GEMM (after weights and LoRAs are in)."""
        from .fp8 import Fp8Linear

        for blk in self.blocks.values():
            a = blk.attn1
            if hasattr(a, "to_qkv"):
                continue
            if isinstance(a.to_q, Fp8Linear):  # fp8 weights: stacked, with one scale per output row
                a.to_qkv = Fp8Linear.cat([a.to_q, a.to_k, a.to_v])
                del a.to_q, a.to_k, a.to_v
                continue
            w = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight])
            b = torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias])
            lin = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            lin.bias.copy_(b)
            a.to_qkv = lin
            del a.to_q, a.to_k, a.to_v

    def compile_elementwise(self) -> None:
        """Fuse the fp32 norms/modulations, residuals and qk-norm+RoPE chains (chains.compiled), and the FFN's GELU
        into its first GEMM (GPU)."""
        self._ew = chains.compiled(self.device)
        self.ffn_epilogue = self.device.type == "cuda"

    # ------------------------------------------------------------------ head
    @torch.no_grad()
    def head(self, h: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """h [b, F*h*w, dim] (own frames only) -> velocity [b, C_out, F, H, W] float32."""
        shift, scale = (self.scale_shift_table + temb.float().unsqueeze(1)).chunk(2, dim=1)
        x = (F.layer_norm(h.float(), (h.shape[-1],), eps=self.config.eps) * (1 + scale) + shift).type_as(h)
        x = self.proj_out(x)
        pt, ph, pw = self.config.patch_size
        f, gh, gw = grid
        b = x.shape[0]
        x = x.reshape(b, f, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()
