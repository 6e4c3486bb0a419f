"""The staged Wan model against diffusers' own WanTransformer3DModel, and the context attention against plain
attention over explicitly concatenated frames (DESIGN §5 property 3)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

import dualparal_core.chains as chains_mod
from dualparal_core.config import WanConfig
from dualparal_core.model import WanStage


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ref_model():
    cfg = WanConfig.tiny(num_layers=3)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():  # diffusers zero-inits some tensors; randomise all so nothing hides a mapping bug
        for n, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in n and p.ndim == 1 else 0.0))
    return cfg, ref


def _stage(cfg, ref, layers, embed, head):
    st = WanStage(cfg, layers, embed=embed, head=head)
    st.load_weights(ref.state_dict())
    return st


def test_stage_equals_diffusers_forward(ref_model):
    cfg, ref = ref_model
    x = torch.randn(2, 16, 5, 8, 12)
    ctx = torch.randn(2, 20, cfg.text_dim)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
    st = _stage(cfg, ref, range(3), True, True)
    tproj, temb = st.time_embed(t)
    h, _ = st.blocks_forward(st.embed(x), tproj, st.prepare_text(ctx), (5, 4, 6))
    got = st.head(h, temb, (5, 4, 6))
    assert _rel(got, want) <= 1e-5


def test_chained_slices_equal_whole_model(ref_model):
    cfg, ref = ref_model
    x = torch.randn(1, 16, 3, 4, 4)
    ctx = torch.randn(1, 7, cfg.text_dim)
    t = torch.tensor([312.5])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
    stages = [_stage(cfg, ref, range(0, 1), True, False), _stage(cfg, ref, range(1, 3), False, True)]
    h = stages[0].embed(x)
    for st in stages:
        h, _ = st.blocks_forward(h, st.time_embed(t)[0], st.prepare_text(ctx), (3, 2, 2))
    got = stages[-1].head(h, stages[-1].time_embed(t)[1], (3, 2, 2))
    assert _rel(got, want) <= 1e-5
    # a rank owning layer 1..2 holds no patch embedding and no other layers
    assert set(stages[1].blocks.keys()) == {"1", "2"} and not hasattr(stages[1], "patch_embedding")


def _explicit_layer(blk, h, tproj, h_nb, tproj_nb, keep, ctx_emb, frames, r_frames, grid_hw):
    """One Wan block where queries come from h and keys/values from [h | first frames of the neighbour], written
    with diffusers' own attention processor and RoPE over the explicitly concatenated sequence."""
    def mod(x, tp):
        shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table + tp).chunk(6, dim=1)
        return (blk.norm1(x.float()) * (1 + scale) + shift), gate, (c_shift, c_scale, c_gate)

    x, gate, (c_shift, c_scale, c_gate) = mod(h, tproj)
    x_nb, _, _ = mod(h_nb, tproj_nb)
    s, n = keep
    cat = torch.cat([x, x_nb[:, s:s + n]], dim=1)
    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    cos, sin = rope(torch.zeros(1, 16, frames + r_frames, 2 * grid_hw[0], 2 * grid_hw[1]))
    out = blk.attn1(cat, None, None, (cos, sin))[:, : x.shape[1]]
    h = h + out * gate
    h = h + blk.attn2(blk.norm2(h), ctx_emb, None, None)
    y = blk.norm3(h) * (1 + c_scale) + c_shift
    return h + blk.ffn(y) * c_gate


@pytest.mark.parametrize("r_frames", [2, 1])
def test_context_attention_equals_explicit_concatenation(ref_model, r_frames):
    cfg, ref = ref_model
    st = _stage(cfg, ref, range(0, 1), True, False)
    gh, gw = 2, 3
    hw = gh * gw
    frames = 4  # window: 2 left-context frames + 2 own
    h_nb = torch.randn(1, frames * hw, cfg.dim)      # the next-newer block's window
    h = torch.randn(1, frames * hw, cfg.dim)
    ctx = torch.randn(1, 9, cfg.text_dim)
    text = st.prepare_text(ctx)
    tp_nb, _ = st.time_embed(torch.tensor([600.0]))
    tp, _ = st.time_embed(torch.tensor([700.0]))
    keep = (2 * hw, r_frames * hw)                   # its first r own frames (after 2 left-context frames)
    _, cache = st.blocks_forward(h_nb, tp_nb, text, (frames, gh, gw), keep=keep)
    got, _ = st.blocks_forward(h, tp, text, (frames, gh, gw), right=cache)
    with torch.no_grad():
        ctx_emb = st.condition_embedder.text_embedder(ctx)
        want = _explicit_layer(ref.blocks[0], h, tp, h_nb, tp_nb, keep, ctx_emb, frames, r_frames, (gh, gw))
    assert _rel(got, want) <= 1e-5
    # and the context matters: without it the output differs
    plain, _ = st.blocks_forward(h, tp, text, (frames, gh, gw))
    assert _rel(plain, want) > 1e-3


def test_random_init_is_independent_of_the_split(tiny_config):
    whole = WanStage(tiny_config, range(3), embed=True, head=True)
    whole.init_random(7)
    part = WanStage(tiny_config, range(2, 3), embed=False, head=True)
    part.init_random(7)
    a, b = whole.state_dict(), part.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bf16_stage_keeps_fp32_modules(tiny_config):
    st = WanStage(tiny_config, range(1), embed=True, head=False, dtype=torch.bfloat16)
    dt = {n: p.dtype for n, p in st.named_parameters()}
    assert dt["blocks.0.scale_shift_table"] == torch.float32
    assert dt["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dt["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dt["blocks.0.norm2.weight"] == torch.float32
    assert dt["blocks.0.attn1.norm_q.weight"] == torch.bfloat16


def test_bad_stage_arguments(tiny_config):
    with pytest.raises(ValueError, match="attention='flash9'"):
        WanStage(tiny_config, range(1), embed=True, head=True, attention_backend="flash9")
    with pytest.raises(ValueError, match="layers range\\(2, 5\\)"):
        WanStage(tiny_config, range(2, 5), embed=True, head=True)
    st = WanStage(tiny_config, range(1), embed=True, head=True)
    with pytest.raises(ValueError, match="missing"):
        st.load_weights({})


def test_fused_qkv_equals_separate_projections(ref_model):
    cfg, ref = ref_model
    st = _stage(cfg, ref, range(3), True, True)
    x = torch.randn(1, 16, 3, 4, 4)
    ctx = torch.randn(1, 7, cfg.text_dim)
    tproj, temb = st.time_embed(torch.tensor([500.0]))
    text = st.prepare_text(ctx)
    want, cache_a = st.blocks_forward(st.embed(x), tproj, text, (3, 2, 2), keep=(4, 4))
    st.fuse_qkv()
    assert not hasattr(st.blocks["0"].attn1, "to_q")
    got, cache_b = st.blocks_forward(st.embed(x), tproj, text, (3, 2, 2), keep=(4, 4))
    assert _rel(got, want) <= 1e-6
    assert all(_rel(cache_b[i][0], cache_a[i][0]) <= 1e-6 for i in cache_a)


@pytest.mark.slow
def test_compiled_elementwise_chains_equal_eager(ref_model):
    """The torch.compile'd norm/modulation, gated residual and qk-norm+RoPE (the GPU default) give the eager
    result, with and without right context (two graph shapes)."""
    cfg, ref = ref_model
    st = _stage(cfg, ref, range(3), True, False)
    h = torch.randn(1, 4 * 6, cfg.dim)
    tp, _ = st.time_embed(torch.tensor([640.0]))
    text = st.prepare_text(torch.randn(1, 9, cfg.text_dim))
    want, cache = st.blocks_forward(h, tp, text, (4, 2, 3), keep=(12, 12))
    want_r, _ = st.blocks_forward(h, tp, text, (4, 2, 3), right=cache)
    st.compile_elementwise()
    got, cache_c = st.blocks_forward(h, tp, text, (4, 2, 3), keep=(12, 12))
    got_r, _ = st.blocks_forward(h, tp, text, (4, 2, 3), right=cache_c)
    assert _rel(got, want) <= 1e-5 and _rel(got_r, want_r) <= 1e-5
    # the chains are built and run with deterministic algorithms on (Inductor then keeps one launch config per
    # reduction instead of timing several: the 2-GPU difference of docs/ARCHITECTURE.md), and the flag is the
    # caller's again afterwards
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []
    probe = chains_mod.deterministic_compiled(lambda x: seen.append(torch.are_deterministic_algorithms_enabled()) or x)
    probe(h)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, restored
    assert all(f.__qualname__.startswith("deterministic_compiled") for f in st._ew.values())


def test_the_head_stage_computes_only_its_own_frames_in_the_last_layer_with_the_same_values():
    """out_from: the last layer of the stage with the head runs the left context as keys and values only. The own
    frames' rows are the full window's rows bit for bit (attention, norms and GEMMs are row by row on CPU), the
    kept K/V are the same, and a stage without the head ignores it (its output feeds the next stage whole)."""
    cfg = WanConfig.tiny(dim=256, num_layers=3)
    st = WanStage(cfg, range(3), embed=True, head=True)
    st.init_random(0)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4 * 12, cfg.dim, generator=g)
    tp, _ = st.time_embed(torch.full((2,), 640.0))
    text = st.prepare_text(torch.randn(2, 9, cfg.text_dim, generator=g))
    full, c_full = st.blocks_forward(h, tp, text, (4, 3, 4), keep=(24, 12))
    own, c_own = st.blocks_forward(h, tp, text, (4, 3, 4), keep=(24, 12), out_from=24)
    assert own.shape == (2, 24, cfg.dim) and torch.equal(own, full[:, 24:])
    assert all(torch.equal(c_full[i][j], c_own[i][j]) for i in c_full for j in range(2))
    mid = WanStage(cfg, range(3), embed=True, head=False)
    mid.init_random(0)
    whole = mid.blocks_forward(h, tp, text, (4, 3, 4), out_from=24)[0]
    assert whole.shape == (2, 48, cfg.dim) and torch.equal(whole, mid.blocks_forward(h, tp, text, (4, 3, 4))[0])
