"""fp8 weights kept in memory (PoolSpec.weights="fp8"), LoRA routing to the experts, loading without a second
copy, and the memory plan."""

from __future__ import annotations

import pytest
import torch
from test_lora import _factors, _save

from dualparal_core.checkpoint import random_state_dict, save_checkpoint
from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.fp8 import Fp8Linear, quantise
from dualparal_core.protocol import Job
from dualparal_core.runtime import build_stage

CFG = WanConfig.tiny()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    out = {"fp8": str(d / "fp8.safetensors"), "bf16": str(d / "bf16.safetensors"),
           "low": str(d / "low.safetensors"), "lora": _save(d / "lora.safetensors", _factors(5), "comfy")}
    save_checkpoint(random_state_dict(CFG, 1), out["fp8"], "fp8_scaled")
    save_checkpoint(random_state_dict(CFG, 1), out["bf16"], "comfy", dtype=torch.bfloat16)
    save_checkpoint(random_state_dict(CFG, 2), out["low"], "comfy")
    return out


def _job() -> Job:
    g = torch.Generator().manual_seed(1)
    sc = SamplingConfig(sigmas=(1.0, 0.7, 0.3, 0.0), sampler="euler", cfg=3.0, seed=5, num_per_block=2, num_cat=1)
    return Job(sc, (1, 16, 5, 4, 4), cond=torch.randn(1, 5, 64, generator=g), uncond=torch.randn(1, 3, 64, generator=g))


def _run(path, weights, dtype="fp32", **src):
    model, info = build_stage(PoolSpec(ModelSource(path=path, **src), devices=("cpu",), dtype=dtype,
                                       weights=weights), 0)
    return run_single_process(model, _job()), model, info


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_in_memory_equals_dequantise_at_load(files, dtype):
    a, _, ia = _run(files["fp8"], "dequant", dtype)
    b, model, ib = _run(files["fp8"], "fp8", dtype)
    assert torch.equal(a, b)  # the same fp8 values, dequantised the same way: the same numbers
    assert isinstance(model.blocks["0"].ffn.net[2], Fp8Linear) and model.blocks["0"].ffn.net[2].weight.dtype == \
        torch.float8_e4m3fn
    assert ib["weight_bytes"] < 0.7 * ia["weight_bytes"]  # the tiny model's embedders weigh relatively more


def test_quantised_at_load_is_within_fp8_rounding(files):
    a, _, _ = _run(files["bf16"], "dequant")
    b, _, _ = _run(files["bf16"], "fp8")
    assert 0 < _rel(b, a) < 5e-2


def test_fused_fp8_linear_equals_its_parts():
    g = torch.Generator().manual_seed(0)
    parts = []
    for n in (3, 5):
        w, s = quantise(torch.randn(n, 8, generator=g))
        parts.append(Fp8Linear(w, s, torch.randn(n, generator=g), torch.float32))
    fused = Fp8Linear.cat(parts)
    assert fused.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(fused.dequantised(), torch.cat([p.dequantised() for p in parts]))  # bit-identical weights
    x = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def _weights(stage) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in stage.state_dict().items():
        out[k] = v
    return out


@pytest.mark.parametrize("expert", ["low", "high", "both"])
def test_lora_goes_to_its_expert_only(files, expert):
    base = dict(path=files["bf16"], low_noise_path=files["low"], random_seed=0)
    plain, _ = build_stage(PoolSpec(ModelSource(**base), devices=("cpu",), dtype="fp32"), 0)
    lora, _ = build_stage(PoolSpec(ModelSource(**base, loras=((files["lora"], 0.8, expert),)), devices=("cpu",),
                                   dtype="fp32"), 0)
    for e, name in enumerate(("high", "low")):
        a, b = _weights(plain.stages[e]), _weights(lora.stages[e])
        changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
        if expert in (name, "both"):
            assert "blocks.0.attn1.to_qkv.weight" in changed and "blocks.2.ffn.net.2.weight" in changed
            assert "proj_out.weight" in changed and "blocks.1.attn2.to_k.weight" in changed
            assert all(k.endswith(".weight") for k in changed)
        else:
            assert changed == [], f"a {expert!r} LoRA changed the {name}-noise expert: {changed[:3]}"


def test_lora_on_fp8_weights_is_within_fp8_rounding_and_leaves_the_rest(files):
    lo = ((files["lora"], 0.8, "both"),)
    a, ma, _ = _run(files["fp8"], "dequant", loras=lo)
    b, mb, _ = _run(files["fp8"], "fp8", loras=lo)
    _, m0, _ = _run(files["fp8"], "fp8")
    assert 0 < _rel(b, a) < 0.1  # e4m3 keeps 3 mantissa bits: up to 6 % per weight
    wb, w0 = _weights(mb), _weights(m0)
    assert torch.equal(wb["blocks.0.attn2.to_q.weight"], w0["blocks.0.attn2.to_q.weight"])  # no LoRA there
    assert not torch.equal(wb["blocks.0.ffn.net.0.proj.weight"], w0["blocks.0.ffn.net.0.proj.weight"])


def test_expert_pair_of_different_shapes_names_both_files(files, tmp_path):
    other = tmp_path / "other.safetensors"
    save_checkpoint(random_state_dict(WanConfig.tiny(num_layers=2), 0), str(other), "comfy")
    with pytest.raises(ValueError, match="differ in shape") as e:
        build_stage(PoolSpec(ModelSource(path=files["bf16"], low_noise_path=str(other)), devices=("cpu",)), 0)
    assert "bf16.safetensors" in str(e.value) and "other.safetensors" in str(e.value)


def test_loading_assigns_the_read_tensors_and_matches_the_plan(files):
    from dualparal_core.model import WanStage

    sd = {k: v.clone() for k, v in random_state_dict(CFG, 3).items()}
    st = WanStage(CFG, range(3), embed=True, head=True, device="meta")
    st.load_weights(sd, assign=True)
    assert st.blocks["1"].ffn.net[2].weight.data_ptr() == sd["blocks.1.ffn.net.2.weight"].data_ptr()
    assert not any(p.is_meta for p in st.parameters())
    for weights in ("dequant", "fp8"):
        spec = PoolSpec(ModelSource(path=files["fp8"], low_noise_path=files["low"]), devices=("cpu",) * 2,
                        dtype="bf16", weights=weights)
        for rank in (0, 1):
            model, info = build_stage(spec, rank)
            assert info["experts"] == 2 and not any(p.is_meta for s in model.stages for p in s.parameters())
            slack = 0 if weights == "dequant" else 2 * 3 * CFG.dim * 4 * 2  # fp8: per-row scales of fused q/k/v
            assert info["planned_weight_bytes"] <= info["weight_bytes"] <= info["planned_weight_bytes"] + slack


def test_memory_plan_of_wan22_a14b():
    from dualparal_core.config import split_layers
    from dualparal_core.memplan import GIB, plan_rank, weight_bytes

    c = WanConfig.wan21_14b()
    whole = weight_bytes(c, range(40), embed=True, head=True, dtype="bf16")
    assert 26 < whole / GIB < 27.5  # 14.3 B parameters in bf16 (time embedder and norms in fp32)
    assert 0.5 < weight_bytes(c, range(40), embed=True, head=True, fp8=True) / whole < 0.55
    r0 = plan_rank(c, split_layers(40, 2)[0], embed=True, head=False, fp8=True, experts=2, batches=(2, 1),
                   frames_p=8, frames_k=8)
    g = r0.gib()
    assert 13 < g["weights"] < 15  # half of two fp8 experts
    # K 8 frames x 1560 tokens x 5120 x (k, v) x batch 2 x 20 layers x 2 bytes
    assert g["cache"] == pytest.approx(8 * 1560 * 5120 * 2 * 2 * 20 * 2 / GIB)
    assert g["total"] > g["weights"] + g["cache"]
