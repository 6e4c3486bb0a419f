"""Checkpoint reading: every file layout round-trips, configs are inferred, slices are lazy, bad files are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualparal_core.checkpoint import (
    KEEP_FP32,
    REQUIRED_BLOCK,
    REQUIRED_TOP,
    diffusers_key,
    expected_shapes,
    info_from_header,
    inspect_checkpoint,
    load_stage_weights,
    original_key,
    random_state_dict,
    read_header,
    save_checkpoint,
)
from dualparal_core.config import WanConfig
from dualparal_core.experts import variant

LOSSLESS = {"diffusers": ("diffusers", ""), "original": ("original", ""),
            "comfy": ("original", "model.diffusion_model."), "comfy_bare": ("original", "diffusion_model.")}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ROOT = Path(__file__).resolve().parents[1]


def _model(cfg: WanConfig, sd: dict | None = None):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    if sd is not None:
        m.load_state_dict(sd, strict=True)
    return m


def _forward(model, cfg: WanConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 8, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _all(path, cfg: WanConfig, dtype=torch.float32) -> dict:
    return load_stage_weights(path, range(cfg.num_layers), embed=True, head=True, dtype=dtype)


def _meta_header(cfg: WanConfig, layout: str = "comfy", dtype: str = "BF16") -> dict:
    """A header {key: (shape, dtype)} of a real-size model, from a diffusers model on the meta device."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        sd = WanTransformer3DModel(**cfg.diffusers_kwargs()).state_dict()
    prefix = "model.diffusion_model." if layout == "comfy" else ""
    return {prefix + (original_key(k) if layout != "diffusers" else k): (tuple(v.shape), dtype) for k, v in sd.items()}


@pytest.fixture(scope="module")
def cfg() -> WanConfig:
    return WanConfig.tiny()


@pytest.fixture(scope="module")
def sd(cfg) -> dict:
    return random_state_dict(cfg, seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for layout in (*LOSSLESS, "fp8_scaled", "fp8"):
        out[layout] = d / f"wan_{layout}.safetensors"
        save_checkpoint(sd, out[layout], layout)
    return out


# ------------------------------------------------------------------------------------------------ key mapping


def test_mapping_matches_diffusers_converter(files, sd):
    """Every key of a ComfyUI-format file maps, and exactly as diffusers' own single-file converter maps it."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(read_header(files["comfy"]))
    assert len(keys) == len(sd) and all(k.startswith("model.diffusion_model.") for k in keys)
    theirs = convert_wan_transformer_to_diffusers({k: k for k in keys})  # {diffusers name: file key}
    ours = {diffusers_key(k[len("model.diffusion_model."):]): k for k in keys}
    assert ours == theirs
    assert set(ours) == set(sd)
    assert all(original_key(d) == k[len("model.diffusion_model."):] for d, k in ours.items())


def test_random_state_dict_matches_diffusers_and_has_no_zeros(cfg, sd):
    ref = _model(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in sd.items()}
    required = set(REQUIRED_TOP) | {f"blocks.{i}.{b}" for i in range(cfg.num_layers) for b in REQUIRED_BLOCK}
    assert required == set(sd)
    assert all(v.dtype == torch.float32 and v.abs().min() > 0 for v in sd.values())
    assert all(not torch.all(v == 1) for v in sd.values())
    again, other = random_state_dict(cfg, seed=0), random_state_dict(cfg, seed=1)
    assert all(torch.equal(sd[k], again[k]) and not torch.equal(sd[k], other[k]) for k in sd)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("layout", list(LOSSLESS))
@pytest.mark.parametrize("store", list(DTYPES), ids=list(DTYPES.values()))
def test_lossless_layouts_round_trip(tmp_path, cfg, sd, layout, store):
    path = tmp_path / f"m_{layout}.safetensors"
    save_checkpoint(sd, path, layout, dtype=store)
    info = inspect_checkpoint(str(path))
    assert (info.layout, info.prefix) == LOSSLESS[layout]
    assert (info.quant, info.dtype, info.config, info.path) == ("none", DTYPES[store], cfg, str(path))
    got = _all(path, cfg, torch.float32)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.to(store).float()), k
    half = _all(path, cfg, torch.bfloat16)
    for k, v in sd.items():
        keep = any(m in k.split(".") for m in KEEP_FP32)
        assert half[k].dtype == (torch.float32 if keep else torch.bfloat16), k
        assert torch.equal(half[k], v.to(store).to(half[k].dtype)), k
    assert any(half[k].dtype == torch.float32 for k in half) and any(half[k].dtype == torch.bfloat16 for k in half)


@pytest.mark.parametrize("layout", list(LOSSLESS))
def test_loaded_weights_give_the_reference_forward(cfg, sd, files, layout):
    """The independent check: a fresh diffusers model loads the dict strictly and computes the same output."""
    ref = _forward(_model(cfg, sd), cfg)
    out = _forward(_model(cfg, _all(files[layout], cfg)), cfg)
    assert _rel(out, ref) <= 1e-5


def test_fp8_layouts_within_fp8_rounding(cfg, sd, files):
    head = read_header(files["fp8_scaled"])
    assert head["model.diffusion_model.scaled_fp8"] == ((0,), "F8_E4M3")
    assert head["model.diffusion_model.blocks.0.ffn.0.weight"][1] == "F8_E4M3"
    assert head["model.diffusion_model.blocks.0.ffn.0.scale_weight"] == ((), "F32")
    ref = _forward(_model(cfg, sd), cfg)
    for layout, quant in (("fp8_scaled", "fp8_scaled"), ("fp8", "fp8")):
        info = inspect_checkpoint(files[layout])
        assert (info.layout, info.prefix, info.quant, info.dtype, info.config) == (
            "original", "model.diffusion_model.", quant, "fp8_e4m3fn", cfg)
        got = _all(files[layout], cfg)
        assert set(got) == set(sd)
        for k, v in sd.items():
            quantised = k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2
            assert got[k].dtype == torch.float32
            assert _rel(got[k], v) < 0.07 if quantised else torch.equal(got[k], v), (layout, k)
        assert _rel(_forward(_model(cfg, got), cfg), ref) < 0.1


def test_scaled_fp8_beats_plain_fp8_on_small_weights(tmp_path, cfg, sd):
    small = {k: v * 0.02 if k.startswith("blocks.") and v.ndim == 2 else v for k, v in sd.items()}  # std ~4e-4
    errs = {}
    for layout in ("fp8_scaled", "fp8"):
        save_checkpoint(small, tmp_path / f"{layout}.safetensors", layout)
        got = _all(tmp_path / f"{layout}.safetensors", cfg)
        errs[layout] = max(_rel(got[k], small[k]) for k in small if k.startswith("blocks.") and small[k].ndim == 2)
    print(f"\nworst per-tensor rel error on small weights: {errs}")
    assert errs["fp8_scaled"] < 0.07 < errs["fp8"]


@pytest.mark.parametrize("variant", ["bare_keys_prefixed_marker", "weight_scale_names", "bf16_rest"])
def test_fp8_scaled_file_variants(tmp_path, cfg, sd, files, variant):
    """Scaled-fp8 files as other tools write them: marker prefixed in a bare file, weight_scale, bf16 non-fp8."""
    tensors = load_file(files["fp8_scaled"])
    p = "model.diffusion_model."
    if variant == "bare_keys_prefixed_marker":
        tensors = {k if k.endswith("scaled_fp8") else k[len(p):]: v for k, v in tensors.items()}
    elif variant == "weight_scale_names":
        tensors = {k.replace(".scale_weight", ".weight_scale"): v for k, v in tensors.items() if "scaled_fp8" not in k}
    else:
        tensors = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and v.ndim else v for k, v in tensors.items()}
    path = tmp_path / f"{variant}.safetensors"
    save_file(tensors, path)
    info = inspect_checkpoint(path)
    assert info.quant == "fp8_scaled" and info.config == cfg
    ref = _all(files["fp8_scaled"], cfg)
    got = _all(path, cfg)
    for k in ref:
        assert torch.equal(got[k], ref[k]) if variant != "bf16_rest" else _rel(got[k], ref[k]) < 0.01, k


# ------------------------------------------------------------------------------------------------ config inference


@pytest.mark.parametrize("layout", [*LOSSLESS, "fp8_scaled", "fp8"])
def test_inspect_infers_other_shapes(tmp_path, layout):
    other = WanConfig.tiny(dim=256, num_layers=2, ffn_dim=512, text_dim=32)
    path = tmp_path / "m.safetensors"
    save_checkpoint(random_state_dict(other, seed=3), path, layout)
    assert inspect_checkpoint(path).config == other


@pytest.mark.parametrize("name, cfg", [("1.3B", WanConfig.wan21_1_3b()), ("14B", WanConfig.wan21_14b())])
@pytest.mark.parametrize("layout", ["comfy", "original", "diffusers"])
def test_config_of_real_model_headers(name, cfg, layout):
    info = info_from_header(_meta_header(cfg, layout), f"wan2.1_t2v_{name}.safetensors")
    assert info.config == cfg
    assert (info.config.dim, info.config.num_layers, info.config.num_heads) == (
        (1536, 30, 12) if name == "1.3B" else (5120, 40, 40))
    assert info.layout == ("diffusers" if layout == "diffusers" else "original") and info.dtype == "bf16"


def test_real_size_variants_are_refused():
    ti2v = WanConfig(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_channels=48, out_channels=48)
    with pytest.raises(ValueError, match=r"wan2\.2_ti2v_5B.*TI2V-5B"):
        info_from_header(_meta_header(ti2v), "wan2.2_ti2v_5B_fp16.safetensors")
    odd = _meta_header(WanConfig.tiny(num_layers=1))
    odd["model.diffusion_model.patch_embedding.weight"] = ((128, 32, 1, 2, 2), "BF16")
    with pytest.raises(ValueError, match=r"odd\.safetensors.*32 input / 16 output latent channels.*I2V 36"):
        info_from_header(odd, "odd.safetensors")
    i2v = replace(WanConfig.tiny(num_layers=1), in_channels=36)  # Wan2.2 I2V A14B's layout: loads as I2V
    assert variant(info_from_header(_meta_header(i2v), "i2v.safetensors").config) == "i2v_concat"


# ------------------------------------------------------------------------------------------------ slicing


def test_slices_hold_only_what_the_rank_owns(cfg, sd, files):
    mid = load_stage_weights(files["comfy"], range(1, 2), embed=False, head=False, dtype=torch.float32)
    cond = {k for k in sd if k.startswith("condition_embedder.")}
    assert set(mid) == {k for k in sd if k.startswith("blocks.1.")} | cond
    assert all(torch.equal(mid[k], sd[k]) for k in mid)
    first = load_stage_weights(files["diffusers"], range(0, 1), embed=True, head=False, dtype=torch.float32)
    assert set(first) == {k for k in sd if k.startswith(("blocks.0.", "patch_embedding."))} | cond
    last = load_stage_weights(files["fp8_scaled"], range(2, 3), embed=False, head=True, dtype=torch.float32)
    assert set(last) == {k for k in sd if k.startswith(("blocks.2.", "proj_out.")) or k == "scale_shift_table"} | cond
    with pytest.raises(ValueError, match="not a non-empty part of the 3 blocks"):
        load_stage_weights(files["comfy"], range(2, 4), embed=False, head=False, dtype=torch.float32)
    stale = inspect_checkpoint(files["fp8"])  # an info that no longer describes the file
    with pytest.raises(ValueError, match="wan_comfy.safetensors' changed since it was inspected"):
        load_stage_weights(files["comfy"], range(1), embed=False, head=False, dtype=torch.float32, info=stale)
    same = load_stage_weights(files["comfy"], range(1, 2), embed=False, head=False, dtype=torch.float32,
                              info=inspect_checkpoint(files["comfy"]))
    assert all(torch.equal(same[k], mid[k]) for k in mid)


_MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys, threading, time
    import psutil, torch
    from dualparal_core.checkpoint import load_stage_weights
    def hwm():  # peak RSS of this process (VmHWM is per address space, so not inherited from pytest)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    path, n = sys.argv[1], int(sys.argv[2])
    proc = psutil.Process(); gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    rss0 = proc.memory_info().rss; hwm0 = hwm(); peak = [rss0]; stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.0005)
    th = threading.Thread(target=sample); th.start()
    w = load_stage_weights(path, range(n), embed=False, head=False, dtype=torch.float32)
    stop.set(); th.join()
    print(json.dumps({"sampled": peak[0] - rss0, "hwm": hwm() - max(rss0, hwm0) if hwm0 <= rss0 + 2**20 else None,
                      "slice": sum(t.numel() * t.element_size() for t in w.values())}))
""")


def test_loading_a_quarter_uses_memory_of_the_slice_not_the_file(tmp_path):
    big = WanConfig.tiny(dim=256, num_layers=16, ffn_dim=1024)
    path = tmp_path / "big.safetensors"
    save_checkpoint(random_state_dict(big, seed=5), path, "comfy")
    size = path.stat().st_size
    res = {}
    for n in (4, 16):
        run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(n)], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert run.returncode == 0, run.stderr
        res[n] = json.loads(run.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    for n, r in res.items():
        hwm = "n/a" if r["hwm"] is None else f"{r['hwm'] / mb:.1f} MB"
        print(f"\nload {n}/16 layers of a {size / mb:.1f} MB file: slice {r['slice'] / mb:.1f} MB, peak RSS growth "
              f"{r['sampled'] / mb:.1f} MB sampled every 0.5 ms, {hwm} by VmHWM")
    quarter = max(res[4]["sampled"], res[4]["hwm"] or 0)
    assert quarter < 0.5 * size
    assert quarter < 1.5 * res[4]["slice"] + 4 * mb


# ------------------------------------------------------------------------------------------------ bad files


def _bad(path: Path, *needles: str) -> None:
    with pytest.raises(ValueError) as err:
        inspect_checkpoint(str(path))
    msg = str(err.value)
    assert path.name in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_files_are_refused_with_a_sentence(tmp_path, files):
    data = files["comfy"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "cut.safetensors", "is truncated")
    (tmp_path / "stub.safetensors").write_bytes(data[:4])
    _bad(tmp_path / "stub.safetensors", "not a safetensors file")
    (tmp_path / "notes.safetensors").write_text("this is a text file, not weights\n" * 10)
    _bad(tmp_path / "notes.safetensors", "not a safetensors file")
    _bad(tmp_path / "missing.safetensors", "cannot be read")
    save_file({"foo": torch.ones(3)}, tmp_path / "foo.safetensors")
    _bad(tmp_path / "foo.safetensors", "not a Wan transformer", "'foo'")
    save_file({"decoder.conv1.weight": torch.ones(3), "encoder.conv1.weight": torch.ones(3)},
              tmp_path / "vae.safetensors")
    _bad(tmp_path / "vae.safetensors", "not a Wan transformer", "VAE")
    (tmp_path / "wan.gguf").write_bytes(b"GGUF" + bytes(64))
    _bad(tmp_path / "wan.gguf", "GGUF is not supported")
    (tmp_path / "renamed_gguf.safetensors").write_bytes(b"GGUF" + bytes(64))
    _bad(tmp_path / "renamed_gguf.safetensors", "GGUF is not supported")


@pytest.mark.parametrize("extra, needle", [
    ({"img_emb.proj.0.weight": (4,)}, "image-to-video"),
    ({"blocks.0.cross_attn.k_img.weight": (128, 128)}, "image-to-video"),
    ({"vace_patch_embedding.weight": (128, 96, 1, 2, 2)}, "VACE"),
    ({"blocks.0.something_new.weight": (4,)}, "not part of a Wan T2V/I2V transformer"),
])
def test_other_wan_variants_are_refused(tmp_path, files, extra, needle):
    tensors = load_file(files["comfy"])
    tensors.update({"model.diffusion_model." + k: torch.ones(s) for k, s in extra.items()})
    path = tmp_path / "variant.safetensors"
    save_file(tensors, path)
    _bad(path, needle)
    with pytest.raises(ValueError, match="variant.safetensors"):
        load_stage_weights(path, range(1), embed=True, head=True, dtype=torch.float32)


def test_incomplete_and_misshapen_files_are_refused(tmp_path, files):
    tensors = load_file(files["comfy"])
    p = "model.diffusion_model."
    no_block = {k: v for k, v in tensors.items() if not k.startswith(p + "blocks.1.")}
    save_file(no_block, tmp_path / "noblock.safetensors")
    _bad(tmp_path / "noblock.safetensors", "blocks [1] are missing")
    no_head = {k: v for k, v in tensors.items() if not k.startswith(p + "head.")}
    save_file(no_head, tmp_path / "nohead.safetensors")
    _bad(tmp_path / "nohead.safetensors", "missing", "proj_out.weight")
    wrong = dict(tensors)
    wrong[p + "blocks.2.ffn.2.weight"] = torch.ones(128, 8)
    save_file(wrong, tmp_path / "wrong.safetensors")
    _bad(tmp_path / "wrong.safetensors", "wrong shape", "blocks.2.ffn.net.2.weight")
    ints = dict(tensors)
    ints[p + "blocks.0.ffn.0.weight"] = torch.ones(256, 128, dtype=torch.int8)
    save_file(ints, tmp_path / "int8.safetensors")
    _bad(tmp_path / "int8.safetensors", "I8")


# ------------------------------------------------------------------------------------------------ one truth each
def test_keep_in_fp32_is_diffusers_list_less_its_weightless_rope(cfg):
    """One list for the loader and the stage: diffusers' own, less "rope", which names a module of non-persistent
    buffers that no file and no stage parameter has (our RoPE tables are computed in float32 per window)."""
    from diffusers import WanTransformer3DModel

    from dualparal_core import files
    from dualparal_core.model import WanStage

    assert set(WanTransformer3DModel._keep_in_fp32_modules) - {"rope"} == set(KEEP_FP32) == set(files.KEEP_FP32)
    with torch.device("meta"):
        diff = WanTransformer3DModel(**cfg.diffusers_kwargs())
    assert any("rope" in n.split(".") for n, _ in diff.named_buffers())  # the module diffusers means
    assert not any("rope" in k.split(".") for k in diff.state_dict())  # ...holds nothing a file could store
    stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.bfloat16)
    assert not any("rope" in n.split(".") for n, _ in stage.named_parameters())
    for name, p in stage.named_parameters():
        assert (p.dtype == torch.float32) == files.keeps_fp32(name), name


def test_one_fp8_predicate(cfg, sd):
    """The loader, the fp8 layer swap, the test-file writer and the memory plan ask one function."""
    from dualparal_core import checkpoint, files, fp8

    assert checkpoint.fp8_target is fp8.fp8_target is files.fp8_target
    chosen = {k for k, v in sd.items() if files.fp8_target(k, tuple(v.shape))}
    assert chosen == {k for k, v in sd.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2}
    assert "blocks.0.attn1.to_q.weight" in chosen and "blocks.0.attn1.norm_q.weight" not in chosen
    assert "patch_embedding.weight" not in chosen and "condition_embedder.time_proj.weight" not in chosen


def test_files_reads_headers_without_torch(tmp_path, files):
    """dualparal_core.files (what ComfyUI's process imports) reads headers only: in a fresh interpreter it
    inspects a checkpoint, checks a LoRA and a model source, and never imports torch or diffusers."""
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 4)}, str(lora))
    code = textwrap.dedent(f"""
        import sys
        from dualparal_core.config import ModelSource
        from dualparal_core.files import check_lora, check_source, inspect_checkpoint
        info = inspect_checkpoint({str(files["comfy"])!r})
        lora = check_lora({str(lora)!r}, info.config)
        src, config = check_source(ModelSource(path={str(files["fp8_scaled"])!r}))
        heavy = sorted(m for m in ("torch", "diffusers", "safetensors", "numpy") if m in sys.modules)
        print(info.layout, info.config.num_layers, sorted(lora.targets), config == info.config, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["original", "3", "['blocks.0.attn1.to_q']", "True", "[]"]
