"""LoRA files in the ComfyUI/original, diffusers/PEFT and kohya layouts: key mapping, merge maths against an
explicit ``W + s·up@down·alpha/rank``, slices, full differences, and refusals that name the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dualparal_core.checkpoint import random_state_dict
from dualparal_core.config import WanConfig
from dualparal_core.lora import check_lora, inspect_lora, lora_plan, merge_loras

CFG = WanConfig.tiny()  # dim 128, 3 layers, ffn 256, text_dim 64
RANK = 4
# (original module, diffusers module, kohya suffix, (out, in))
MODULES = [
    ("self_attn.q", "attn1.to_q", "self_attn_q", (128, 128)),
    ("self_attn.o", "attn1.to_out.0", "self_attn_o", (128, 128)),
    ("cross_attn.k", "attn2.to_k", "cross_attn_k", (128, 128)),
    ("ffn.0", "ffn.net.0.proj", "ffn_0", (256, 128)),
    ("ffn.2", "ffn.net.2", "ffn_2", (128, 256)),
]
TOP = [("text_embedding.0", "condition_embedder.text_embedder.linear_1", "text_embedding_0", (128, 64)),
       ("head.head", "proj_out", "head_head", (64, 128))]


def _factors(seed: int = 0, alpha: float | None = 2.0):
    """{diffusers module: (down, up, alpha)} for every block module and two top-level ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(CFG.num_layers):
        for orig, diff, kohya, (o, n) in MODULES:
            out[f"blocks.{i}.{diff}"] = (torch.randn(RANK, n, generator=g), torch.randn(o, RANK, generator=g), alpha,
                                         f"blocks.{i}.{orig}", f"blocks_{i}_{kohya}")
    for orig, diff, kohya, (o, n) in TOP:
        out[diff] = (torch.randn(RANK, n, generator=g), torch.randn(o, RANK, generator=g), alpha, orig, kohya)
    return out


def _save(path, factors, layout: str) -> str:
    sd = {}
    for diff, (down, up, alpha, orig, kohya) in factors.items():
        if layout == "comfy":
            base, d, u = f"diffusion_model.{orig}", ".lora_down.weight", ".lora_up.weight"
        elif layout == "diffusers":
            base, d, u = f"transformer.{diff}", ".lora_A.weight", ".lora_B.weight"
        elif layout == "kohya":
            base, d, u = f"lora_unet_{kohya}", ".lora_down.weight", ".lora_up.weight"
        else:
            raise AssertionError(layout)
        sd[base + d], sd[base + u] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[base + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return str(path)


def _slice(sd: dict, layers: range) -> dict:
    """What load_stage_weights gives a middle rank: its blocks and the embedders, no patch embedding or head."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            if int(k.split(".")[1]) in layers:
                out[k] = v.clone()
        elif k.startswith("condition_embedder."):
            out[k] = v.clone()
    return out


def _expected(w: torch.Tensor, down, up, alpha, strength: float) -> torch.Tensor:
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    return w + strength * (up @ down) * scale


@pytest.fixture(scope="module")
def base_sd():
    return random_state_dict(CFG, seed=0)


@pytest.mark.parametrize("layout,alpha", [("comfy", 2.0), ("diffusers", None), ("diffusers", 8.0), ("kohya", 2.0)])
def test_merge_matches_the_formula_for_every_layout(tmp_path, base_sd, layout, alpha):
    factors = _factors(alpha=alpha)
    path = _save(tmp_path / f"{layout}.safetensors", factors, layout)
    info = inspect_lora(path)
    assert info.layout == {"comfy": "original"}.get(layout, layout) and info.ranks == (RANK,) and not info.unmatched
    layers = range(1, 3)
    sd = _slice(base_sd, layers)
    merged = merge_loras(sd, [(path, 0.7)], layers)
    assert merged is sd  # in place: no second copy of the slice
    for key, w0 in _slice(base_sd, layers).items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and module in factors and module != "proj_out":
            down, up, a, *_ = factors[module]
            torch.testing.assert_close(merged[key], _expected(w0, down, up, a, 0.7), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(merged[key], w0), key
    assert "blocks.0.attn1.to_q.weight" not in merged  # another rank's layers stay out of the slice


def test_head_and_block_zero_on_their_ranks(tmp_path, base_sd):
    factors = _factors()
    path = _save(tmp_path / "l.safetensors", factors, "comfy")
    last = {k: v.clone() for k, v in base_sd.items() if k.startswith(("proj_out", "blocks.2."))}
    merge_loras(last, [(path, 1.0)], range(2, 3))
    down, up, a, *_ = factors["proj_out"]
    torch.testing.assert_close(last["proj_out.weight"], _expected(base_sd["proj_out.weight"], down, up, a, 1.0))


def test_chained_loras_add_up_and_dtype_is_kept(tmp_path, base_sd):
    f1, f2 = _factors(seed=1), _factors(seed=2, alpha=None)
    p1 = _save(tmp_path / "a.safetensors", f1, "kohya")
    p2 = _save(tmp_path / "b.safetensors", f2, "diffusers")
    key = "blocks.1.ffn.net.0.proj.weight"
    sd = {key: base_sd[key].to(torch.bfloat16)}
    merge_loras(sd, [(p1, 1.0), (p2, -0.5, "both")], range(0, 3))
    assert sd[key].dtype == torch.bfloat16
    m = "blocks.1.ffn.net.0.proj"
    want = base_sd[key].to(torch.bfloat16).float()
    want = (want + (f1[m][1] @ f1[m][0]) * f1[m][2] / RANK).to(torch.bfloat16).float()
    want = want - 0.5 * (f2[m][1] @ f2[m][0])
    torch.testing.assert_close(sd[key].float(), want.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_strength_zero_changes_nothing(tmp_path, base_sd):
    path = _save(tmp_path / "l.safetensors", _factors(), "comfy")
    sd = _slice(base_sd, range(3))
    merge_loras(sd, [(path, 0.0)], range(3))
    assert all(torch.equal(v, base_sd[k]) for k, v in sd.items())


def test_full_differences_and_conv_lora(tmp_path, base_sd):
    g = torch.Generator().manual_seed(5)
    diff_w = torch.randn(128, generator=g)
    diff_b = torch.randn(128, generator=g)
    mod = torch.randn(1, 6, 128, generator=g)
    down = torch.randn(RANK, 16, 1, 2, 2, generator=g)
    up = torch.randn(128, RANK, 1, 1, 1, generator=g)
    path = tmp_path / "d.safetensors"
    save_file({"diffusion_model.blocks.0.norm3.diff": diff_w, "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
               "diffusion_model.blocks.0.modulation.diff": mod,
               "diffusion_model.patch_embedding.lora_down.weight": down,
               "diffusion_model.patch_embedding.lora_up.weight": up}, str(path))
    sd = {k: v.clone() for k, v in base_sd.items() if k.startswith(("blocks.0.", "patch_embedding"))}
    merge_loras(sd, [(str(path), 0.5)], range(0, 1))
    torch.testing.assert_close(sd["blocks.0.norm2.weight"], base_sd["blocks.0.norm2.weight"] + 0.5 * diff_w)
    torch.testing.assert_close(sd["blocks.0.attn1.to_q.bias"], base_sd["blocks.0.attn1.to_q.bias"] + 0.5 * diff_b)
    torch.testing.assert_close(sd["blocks.0.scale_shift_table"], base_sd["blocks.0.scale_shift_table"] + 0.5 * mod)
    conv = (up.flatten(1) @ down.flatten(1)).reshape(base_sd["patch_embedding.weight"].shape)
    torch.testing.assert_close(sd["patch_embedding.weight"], base_sd["patch_embedding.weight"] + 0.5 * conv)
    check_lora(str(path), CFG)


def test_unmatched_lora_is_an_error_naming_the_file(tmp_path, base_sd):
    path = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(ValueError, match="sdxl_style.safetensors.*matches nothing"):
        merge_loras(_slice(base_sd, range(3)), [(str(path), 1.0)], range(3))
    with pytest.raises(ValueError, match="sdxl_style.safetensors"):
        check_lora(str(path), CFG)
    bad = tmp_path / "not_safetensors.safetensors"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not_safetensors.safetensors"):
        inspect_lora(str(bad))


def test_lora_for_another_model_size_is_refused(tmp_path):
    path = _save(tmp_path / "l.safetensors", _factors(), "comfy")
    check_lora(path, CFG)
    with pytest.raises(ValueError, match="another size"):
        check_lora(path, WanConfig.tiny(dim=256))
    with pytest.raises(ValueError, match="block 2 but the model has only 2 blocks"):
        check_lora(path, WanConfig.tiny(num_layers=2))


def test_partial_lora_keeps_what_matches_and_reports_the_rest(tmp_path):
    down, up = torch.randn(RANK, 128), torch.randn(128, RANK)
    path = tmp_path / "mixed.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": down.clone(),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": up.clone()}, str(path))
    info = check_lora(str(path), CFG)
    assert list(info.targets) == ["blocks.0.attn1.to_q"] and len(info.unmatched) == 2


def test_half_a_pair_is_refused():
    with pytest.raises(ValueError, match="incomplete"):
        lora_plan(["diffusion_model.blocks.0.self_attn.q.lora_down.weight"], "x.safetensors")


@pytest.mark.parametrize("key,module", [
    ("diffusion_model.blocks.7.self_attn.q.lora_down.weight", "blocks.7.attn1.to_q"),
    ("model.diffusion_model.blocks.7.cross_attn.o.lora_up.weight", "blocks.7.attn2.to_out.0"),
    ("blocks.7.ffn.2.lora_A.weight", "blocks.7.ffn.net.2"),
    ("transformer.blocks.12.attn1.to_out.0.lora_B.weight", "blocks.12.attn1.to_out.0"),
    ("base_model.model.blocks.3.ffn.net.0.proj.lora_A.default.weight", "blocks.3.ffn.net.0.proj"),
    ("lora_unet_blocks_12_cross_attn_v.lora_down.weight", "blocks.12.attn2.to_v"),
    ("lora_transformer_blocks_4_attn1_to_k.lora_up.weight", "blocks.4.attn1.to_k"),
    ("lora_unet_time_projection_1.alpha", "condition_embedder.time_proj"),
    ("diffusion_model.time_embedding.2.lora_down.weight", "condition_embedder.time_embedder.linear_2"),
])
def test_key_mapping(key, module):
    swap = {"lora_down": "lora_up", "lora_up": "lora_down", "lora_A": "lora_B", "lora_B": "lora_A"}
    partner = next((key.replace(a, b) for a, b in swap.items() if f".{a}." in key), None)
    targets, unmatched, _ = lora_plan([key] + ([partner] if partner else []), "x")
    assert list(targets) == [module] and not unmatched
