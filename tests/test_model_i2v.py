"""The image-to-video stage against diffusers' own ``WanTransformer3DModel`` built with the I2V options
(``image_dim``, ``added_kv_proj_dim``, FLF2V's ``pos_embed_seq_len``), on the same random weights, and the
header-only detection of the I2V layouts in ComfyUI's key names."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dualparal_core.checkpoint import save_checkpoint
from dualparal_core.config import WanConfig
from dualparal_core.experts import default_boundary
from dualparal_core.experts import variant as conditioning_variant
from dualparal_core.files import inspect_checkpoint
from dualparal_core.model import WanStage
from dualparal_core.testing import tiny_config

# Relative L2 error allowed between our stage and diffusers' forward in float32: the same weights and maths in
# another order (fused/unfused projections, RoPE applied on half-tables, summation order of attention) leave
# differences of a few 1e-7 per element; 1e-5 is 10-100x that and far below any mapping bug (which gives O(1)).
REL_TOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ref(cfg: WanConfig) -> WanTransformer3DModel:
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():  # diffusers zero-inits some tensors (pos_embed): randomise all so nothing hides
        for n, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in n and p.ndim == 1 else 0.0))
    return ref


def _ours(cfg, ref, x, t, ctx, clip, grid, split=None):
    """Our forward: stages over ``split`` (layer ranges), image+text K/V once, then the head."""
    split = split or [range(cfg.num_layers)]
    stages = []
    for j, layers in enumerate(split):
        st = WanStage(cfg, layers, embed=j == 0, head=j == len(split) - 1)
        st.load_weights(ref.state_dict())
        stages.append(st)
    h = stages[0].embed(x)
    for st in stages:
        h, _ = st.blocks_forward(h, st.time_embed(t)[0], st.prepare_text(ctx, clip), grid)
    return stages[-1].head(h, stages[-1].time_embed(t)[1], grid)


@pytest.mark.parametrize("variant", ["i2v", "flf2v", "i2v_concat"])
def test_i2v_stage_equals_diffusers_forward(variant):
    cfg = tiny_config(variant, num_layers=3)
    ref = _ref(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 36, 3, 4, 6, generator=g)  # 16 noise + 4 mask + 16 image-latent channels
    ctx = torch.randn(2, 512, cfg.text_dim, generator=g)  # diffusers' I2V split assumes 512 text tokens
    t = torch.tensor([700.0, 700.0])
    clip = dclip = None
    if variant == "i2v":
        clip = dclip = torch.randn(2, 257, 1280, generator=g)
    elif variant == "flf2v":  # ComfyUI joins start and end tokens along the tokens; diffusers along the batch
        clip = torch.randn(2, 514, 1280, generator=g)
        dclip = clip.reshape(4, 257, 1280)
    with torch.no_grad():
        want = ref(x, t, ctx, encoder_hidden_states_image=dclip, return_dict=False)[0]
    got = _ours(cfg, ref, x, t, ctx, clip, (3, 2, 3), split=[range(0, 1), range(1, 3)])
    assert got.shape == want.shape == (2, 16, 3, 4, 6)
    assert _rel(got, want) <= REL_TOL
    if variant != "i2v_concat":  # the image path is live: other image tokens change the output
        other = _ours(cfg, ref, x, t, ctx, torch.randn_like(clip), (3, 2, 3))
        assert _rel(other, want) > 1e-3


@pytest.mark.parametrize("variant", ["i2v", "flf2v", "i2v_concat"])
def test_comfy_i2v_files_are_detected_from_their_header(tmp_path, variant):
    from dualparal_core.checkpoint import random_state_dict

    cfg = tiny_config(variant)
    path = tmp_path / f"{variant}.safetensors"
    save_checkpoint(random_state_dict(cfg), str(path), "comfy")
    info = inspect_checkpoint(str(path))
    assert info.config == cfg and conditioning_variant(info.config) == variant
    assert info.config.concat_channels == 20 and default_boundary(info.config) == 0.9
    assert default_boundary(WanConfig.tiny()) == 0.875


def test_a_half_i2v_file_is_refused_naming_what_it_has(tmp_path):
    from safetensors.torch import save_file

    from dualparal_core.checkpoint import random_state_dict
    from dualparal_core.files.wan import original_key

    sd = random_state_dict(tiny_config("i2v"))
    keep = {original_key(k): v for k, v in sd.items() if "add_k_proj" not in k and "add_v_proj" not in k
            and "norm_added_k" not in k}
    path = tmp_path / "half.safetensors"
    save_file(keep, str(path))
    with pytest.raises(ValueError, match=r"half\.safetensors.*img_emb.*no k_img/v_img"):
        inspect_checkpoint(str(path))


def test_unsupported_variants_keep_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from dualparal_core.checkpoint import random_state_dict
    from dualparal_core.files.wan import original_key

    sd = {original_key(k): v for k, v in random_state_dict(WanConfig.tiny()).items()}
    for name, extra, want in (
            ("vace", {"vace_patch_embedding.weight": torch.zeros(128, 96, 1, 2, 2)}, "VACE"),
            ("camera", {"control_adapter.conv.weight": torch.zeros(4, 4)}, "camera-control"),
            ("ti2v", {"patch_embedding.weight": torch.zeros(128, 48, 1, 2, 2),
                      "head.head.weight": torch.zeros(48 * 4, 128), "head.head.bias": torch.zeros(48 * 4)},
             "48 input / 48 output")):
        path = tmp_path / f"{name}.safetensors"
        save_file({**sd, **extra}, str(path))
        with pytest.raises(ValueError, match=rf"{name}\.safetensors.*{want}"):
            inspect_checkpoint(str(path))


def test_the_command_line_refuses_an_i2v_model_naming_it(tmp_path):
    """The headless CLI has no image input: an I2V file is refused before anything starts, not zero-filled."""
    from dualparal_core.checkpoint import random_state_dict
    from dualparal_core.headless.checks import check_model

    path = tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors"
    save_checkpoint(random_state_dict(tiny_config("i2v")), str(path), "comfy")
    with pytest.raises(ValueError, match=r"--model=.*wan2\.1_i2v_480p.*image-to-video model \(i2v\).*WanImageToVideo"):
        check_model(str(path), 2)
