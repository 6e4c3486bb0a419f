"""The node layer without ComfyUI: devices grammar, CONDITIONING extraction, LATENT checks and scaling, the LoRA
chain, and the pool registry (against a fake pool). The bridge itself is tested in tests/comfy_live."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualparal_core.config import ModelSource, PoolSpec, WanConfig

ROOT = Path(__file__).resolve().parents[1]
PKG = "dualparal_pack_unit"


def _pack_module(name: str):
    """A module of the pack's node layer, imported as ComfyUI imports the pack (never as top-level `nodes`)."""
    if PKG not in sys.modules:
        spec = importlib.util.spec_from_file_location(PKG, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PKG] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PKG}.nodes.{name}")


T = _pack_module("types")
R = _pack_module("registry")
CFG = WanConfig(dim=128, ffn_dim=256, num_layers=2, num_heads=1, text_dim=4096)
# Wan21 latent format (comfy/latent_formats.py), written out here.
MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]).view(1, 16, 1, 1, 1)
STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]).view(1, 16, 1, 1, 1)


class Wan21Format:
    """Stand-in for comfy.latent_formats.Wan21 with the same formulas (scale_factor 1.0)."""

    def __init__(self):
        self.calls = 0

    def process_in(self, x):
        self.calls += 1
        return (x - MEAN.to(x.device, x.dtype)) / STD.to(x.device, x.dtype)

    def process_out(self, x):
        return x * STD.to(x.device, x.dtype) + MEAN.to(x.device, x.dtype)


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("text,gpus,want", [
    ("auto", 0, ("cpu", "cpu")), ("AUTO ", 3, ("cuda:0", "cuda:1", "cuda:2")), ("", 1, ("cuda:0",)),
    ("0,1,3", 4, ("cuda:0", "cuda:1", "cuda:3")), (" cuda:2, cuda:0 ", 3, ("cuda:2", "cuda:0")),
    ("cpu:4", 2, ("cpu",) * 4), ("cpu", 0, ("cpu",)), ("1", 2, ("cuda:1",)),
])
def test_devices(text, gpus, want):
    assert T.parse_devices(text, gpus) == want


def test_devices_attach():
    assert T.parse_devices("tcp://10.0.0.5:29500", 0) == T.Attach("tcp://10.0.0.5:29500")


@pytest.mark.parametrize("text,gpus,needle", [
    ("0,0", 2, "twice"), ("5", 2, "names cuda:5, but this ComfyUI process sees 2 CUDA device(s)"),
    ("0", 0, "sees 0 CUDA device(s)"), ("gpu0", 2, "'gpu0' is not a GPU index"), ("tcp://host", 0, "tcp://HOST:PORT"),
    ("cpu:0", 0, "cpu:1 or more"), (",", 2, "names no device"), ("cuda:1,cuda:1", 2, "twice"),
])
def test_devices_errors_name_the_input(text, gpus, needle):
    with pytest.raises(ValueError, match="devices=") as e:
        T.parse_devices(text, gpus)
    assert needle in str(e.value)
    assert repr(text) in str(e.value)  # the value as the user wrote it


# The grammar itself (dualparal_core.config.parse_devices): every form, each refusal, and its four callers.
@pytest.mark.parametrize("text,gpus,want", [
    ("auto", 2, ("cuda:0", "cuda:1")), ("auto", 0, ("cpu", "cpu")), (" ", 1, ("cuda:0",)),
    ("0,1", None, ("cuda:0", "cuda:1")), ("3,1", 2, ("cuda:3", "cuda:1")),  # visibility is check_visible's
    ("cuda:0,cuda:1", None, ("cuda:0", "cuda:1")), ("CUDA:1, 0", None, ("cuda:1", "cuda:0")),
    ("cpu", None, ("cpu",)), ("cpu:3", None, ("cpu",) * 3), ("cpu,cpu", None, ("cpu", "cpu")),
    (("cpu", "cpu"), None, ("cpu", "cpu")), (("0", "cuda:1"), None, ("cuda:0", "cuda:1")),
    ("tcp://10.0.0.5:29500", None, ("tcp://10.0.0.5:29500",)), (" tcp://[::1]:29500 ", None, ("tcp://[::1]:29500",)),
])
def test_devices_grammar_forms(text, gpus, want):
    from dualparal_core.config import parse_devices

    assert parse_devices(text, gpus) == want


@pytest.mark.parametrize("text,kw,needle", [
    ("auto", {}, "depends on the GPUs a process sees"), ("", {}, "depends on the GPUs a process sees"),
    ("0,0", {}, "lists a GPU twice"), ("cuda:0,0", {}, "lists a GPU twice"), ("cpu,0", {}, "mixes GPUs and CPU"),
    ("gpu0", {}, "'gpu0' is not a GPU index; use 'auto'"), ("cuda", {}, "'cuda' is not a GPU index"),
    ("cuda:x", {}, "'cuda:x' is not a GPU index"), ("-1", {}, "'-1' is not a GPU index"),
    (",", {}, "names no device"), ("cpu:0", {}, "use cpu:1 or more"), ("tcp://host", {}, "tcp://HOST:PORT"),
    ("tcp://h:99999", {}, "tcp://HOST:PORT"), ("tcp://h:1", {"attach": False}, "starts its own ranks"),
    ("5", {"name": "--devices", "gpu_count": 1}, None),  # parses; check_visible refuses (below)
])
def test_devices_grammar_refusals_name_input_value_and_fix(text, kw, needle):
    from dualparal_core.config import parse_devices

    name = kw.get("name", "devices")
    if needle is None:
        assert parse_devices(text, **kw) == ("cuda:5",)
        return
    with pytest.raises(ValueError) as e:
        parse_devices(text, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{name}={text!r}") and needle in msg


def test_check_visible_names_who_sees_what():
    from dualparal_core.config import check_visible

    check_visible(("cuda:0", "cuda:1"), 2, shown="'0,1'")
    check_visible(("cpu", "cpu"), 0, shown="'cpu:2'")
    with pytest.raises(ValueError) as e:
        check_visible(("cuda:0", "cuda:3"), 2, shown="'0,3'", name="--devices", seen_by="the workers see",
                      cuda_visible="2,3")
    assert str(e.value).startswith("--devices='0,3' names cuda:3, but the workers see 2 CUDA device(s)")
    assert "CUDA_VISIBLE_DEVICES='2,3'" in str(e.value) and "cuda:0..cuda:1" in str(e.value)
    with pytest.raises(ValueError, match=r"sees 0 CUDA device\(s\).*'cpu:N'"):
        check_visible(("cuda:0",), 0, shown="'0'")


def test_pool_spec_and_cli_use_the_grammar(monkeypatch):
    """PoolSpec normalises any named form and refuses the rest with the grammar's sentences; the CLI accepts the
    `cuda:N` form the Loader documents and refuses with the same sentence."""
    from dualparal_core.headless import checks
    from dualparal_core.headless.checks import cli_devices as _devices

    src = ModelSource(random_config=WanConfig.tiny())
    assert PoolSpec(src, devices=("0", "cuda:1")).devices == ("cuda:0", "cuda:1")
    assert PoolSpec(src, devices="cpu:2").devices == ("cpu", "cpu")
    for bad, needle in ((("cuda:0", "cuda:0"), "twice"), (("cpu", "cuda:0"), "mixes"), (("cuda",), "GPU index"),
                        (("tcp://h:1",), "starts its own ranks"), ((), "is empty")):
        with pytest.raises(ValueError, match=needle):
            PoolSpec(src, devices=bad)
    monkeypatch.setattr(checks, "visible_gpus", lambda: 2)  # the CLI counts GPUs without importing torch
    assert _devices("cuda:0,cuda:1") == _devices("0,1") == _devices("auto") == ("cuda:0", "cuda:1")
    assert _devices("cpu:3") == ("cpu",) * 3 and _devices("cpu") == ("cpu",)
    for bad, needle in (("2", "names cuda:2, but this process sees 2 CUDA device(s)"), ("gpu0", "GPU index"),
                        ("tcp://h:1", "starts its own ranks")):
        with pytest.raises(ValueError, match=re.escape(needle)) as e:  # main() turns it into one line, exit 2
            _devices(bad)
        assert str(e.value).startswith(f"--devices={bad!r}")


def test_missing_gpus():
    assert T.missing_gpus(("cuda:0", "cuda:3"), 2) == ["cuda:3"]
    assert T.missing_gpus(("cpu", "cpu"), 0) == []



def test_check_spec_applies_the_grammar_before_any_spawn(monkeypatch):
    """check_spec parses the spec's devices again (an unpickled spec skipped PoolSpec's check) and refuses GPUs the
    workers would not see, in the grammar's words."""
    from dualparal_core import runtime

    src = ModelSource(random_config=WanConfig.tiny())
    spec = PoolSpec(src, devices=("cpu",))
    object.__setattr__(spec, "devices", ("cuda:0", "cpu"))  # as a spec that bypassed __post_init__
    with pytest.raises(ValueError, match=r"devices=\['cuda:0', 'cpu'\] mixes GPUs and CPU ranks"):
        runtime.check_spec(spec, {})
    monkeypatch.setattr(runtime, "_count_cuda", lambda env: 1)
    with pytest.raises(ValueError) as e:
        runtime.check_spec(PoolSpec(src, devices="0,1"), {"CUDA_VISIBLE_DEVICES": "3"})
    assert str(e.value).startswith("devices=['cuda:0', 'cuda:1'] names cuda:1, but the workers see 1 CUDA device")
    assert "CUDA_VISIBLE_DEVICES='3'" in str(e.value)

# ------------------------------------------------------------------------------------------------ conditioning
def _cond(width=4096, n=1, **extra):
    t = torch.randn(1, 7, width)
    return [[t, {"pooled_output": None, **extra}] for _ in range(n)]


def test_conditioning_is_the_first_tensor_copied():
    c = _cond(start_percent=0.0, end_percent=1.0, strength=1.0, some_new_key=None)
    out = T.extract_conditioning(c, "positive", 4096)
    assert torch.equal(out, c[0][0]) and out.data_ptr() != c[0][0].data_ptr() and out.dtype == torch.float32
    half = [[c[0][0].half(), {"pooled_output": None}]]
    assert T.extract_conditioning(half, "negative", 4096).dtype == torch.float32


@pytest.mark.parametrize("cond,needle", [
    (_cond(n=2), "holds 2 conditionings"),
    (_cond(area=(8, 8, 0, 0)), "'area'"),
    (_cond(mask=torch.ones(1, 4, 4)), "'mask'"),
    (_cond(hooks=object()), "hooks"),
    (_cond(control=object()), "ControlNet"),
    (_cond(start_percent=0.2), "timestep range"),
    (_cond(strength=0.5), "strength=0.5"),
    (_cond(mystery=3), "'mystery'"),
    (_cond(width=768), r"\[1, tokens, 4096\]"),
    ([[torch.zeros(7, 4096), {}]], "shape"),
    ([], "not a CONDITIONING"),
    ("text", "not a CONDITIONING"),
])
def test_conditioning_refusals_name_the_input(cond, needle):
    with pytest.raises(ValueError, match=needle) as e:
        T.extract_conditioning(cond, "negative", 4096)
    assert str(e.value).startswith("negative")


# ------------------------------------------------------------------------------------------------ latent
def test_latent_checks():
    with pytest.raises(ValueError, match="latent_image has a noise_mask"):
        T.check_latent_dict({"samples": torch.zeros(1, 16, 2, 4, 4), "noise_mask": torch.ones(1, 1, 4, 4)})
    with pytest.raises(ValueError, match="not a LATENT"):
        T.check_latent_dict(torch.zeros(1))
    T.check_latent_shape(torch.zeros(2, 16, 5, 60, 104), CFG)
    for shape, needle in [((1, 16, 4, 6), "5-D"), ((1, 48, 3, 4, 4), "48 channels.*TI2V"),
                          ((1, 16, 3, 5, 4), "multiples of 16"), ((1, 4, 3, 4, 4), "4 channels")]:
        with pytest.raises(ValueError, match=needle):
            T.check_latent_shape(torch.zeros(shape), CFG)


def test_latent_scaling_in_and_out():
    fmt = Wan21Format()
    raw = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64) * 3 + 0.5
    norm = T.to_model_space(raw, fmt)
    assert norm.dtype == torch.float32 and norm.is_contiguous()
    torch.testing.assert_close(norm, ((raw - MEAN.double()) / STD.double()).float())
    torch.testing.assert_close(T.from_model_space(norm, fmt), raw.float(), rtol=1e-5, atol=1e-5)
    zero = torch.zeros(1, 16, 3, 4, 4)
    assert T.to_model_space(zero, fmt) is None and fmt.calls == 1  # an empty latent is never shifted
    assert T.is_empty_latent(zero) and not T.is_empty_latent(raw)


def test_output_latent_is_ksamplers_copy():
    latent = {"samples": torch.zeros(1), "batch_index": [2]}
    out = T.output_latent(latent, torch.ones(1))
    assert out["batch_index"] == [2] and torch.equal(out["samples"], torch.ones(1))
    assert torch.equal(latent["samples"], torch.zeros(1))


def test_lora_chain():
    a = T.chain_loras(None, "a.safetensors", 1.0)
    b = T.chain_loras(a, "b.safetensors", -0.5, "low")
    assert b == (("a.safetensors", 1.0, "both"), ("b.safetensors", -0.5, "low"))
    assert a == (("a.safetensors", 1.0, "both"),)
    with pytest.raises(ValueError, match="previous"):
        T.chain_loras([("x",)], "c", 1.0)
    with pytest.raises(ValueError, match="expert"):
        T.chain_loras(None, "c", 1.0, "medium")


def test_file_key_changes_with_the_file(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"1")
    k1 = T.file_key(str(p))
    p.write_bytes(b"22")
    assert T.file_key(str(p)) != k1


# ------------------------------------------------------------------------------------------------ registry
class FakePool:
    started: list = []

    def __init__(self, spec, fail_close=False, **kw):
        self.spec, self.alive, self.closed, self.kw, self.fail_close = spec, True, 0, kw, fail_close
        FakePool.started.append(self)

    def close(self):
        self.alive = False
        self.closed += 1
        if self.fail_close:
            raise RuntimeError("close failed")


def _spec(*devices):
    return PoolSpec(source=ModelSource(path="/m.safetensors"), devices=devices)


def test_registry_reuse_replace_and_release():
    freed = []
    reg = R.PoolRegistry(FakePool, before_start=freed.append)
    a = reg.acquire(("a",), _spec("cuda:0", "cuda:1"), should_abort=None)
    assert reg.acquire(("a",), _spec("cuda:0", "cuda:1")) is a and len(freed) == 1  # same key: reused
    b = reg.acquire(("b",), _spec("cuda:2", "cuda:3"))  # disjoint GPUs: both live
    assert a.alive and b.alive and len(reg) == 2
    c = reg.acquire(("c",), _spec("cuda:1", "cuda:2"))  # overlaps both: both closed first
    assert a.closed == b.closed == 1 and c.alive and len(reg) == 1
    c.alive = False  # a dead group is replaced on the next acquire
    d = reg.acquire(("c",), _spec("cuda:1", "cuda:2"))
    assert d is not c and c.closed == 1
    assert reg.release(("c",), "test") and not reg.release(("c",), "again") and len(reg) == 0
    assert a.kw == {"should_abort": None}


def test_registry_cpu_groups_compete_and_close_errors_are_contained():
    reg = R.PoolRegistry(lambda spec, **kw: FakePool(spec, fail_close=True))
    a = reg.acquire(("a",), _spec("cpu", "cpu"))
    b = reg.acquire(("b",), _spec("cpu"))
    assert a.closed == 1 and b.alive  # the failing close was logged, not raised
    assert reg.close_all("exit") == 1 and not b.alive and reg.pools == []


# ------------------------------------------------------------------------------------------------ import hygiene
def test_pure_node_modules_import_without_comfyui():
    code = (f"import importlib, importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('p', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m = importlib.util.module_from_spec(s); "
            f"sys.modules['p'] = m; s.loader.exec_module(m); sys.path.insert(0, {str(ROOT)!r}); "
            f"importlib.import_module('p.nodes.types'); importlib.import_module('p.nodes.registry'); "
            f"bad = sorted(k for k in sys.modules if k.split('.')[0] in "
            f"('comfy', 'comfy_api', 'folder_paths', 'nodes', 'diffusers')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_loading_the_pack_imports_no_diffusers_and_no_model_code():
    """What ComfyUI does at start-up (import the pack, then its extension and so every node module), in a fresh
    interpreter with stand-ins for ComfyUI's modules: diffusers (seconds to import), the model, the VAE and the
    tensor-reading checkpoint code stay unloaded until a node runs; the Loader's checks read headers only."""
    code = (f"import importlib, importlib.util, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            f"import torch, comfy_stand_in; comfy_stand_in.install(); "
            f"s = importlib.util.spec_from_file_location('p', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m = importlib.util.module_from_spec(s); "
            f"sys.modules['p'] = m; s.loader.exec_module(m); ext = importlib.import_module('p.nodes.extension'); "
            f"print(len(ext.NODES), sorted(k for k in sys.modules if k.split('.')[0] == 'diffusers' or k in "
            f"('dualparal_core.model', 'dualparal_core.vae', 'dualparal_core.checkpoint', 'dualparal_core.lora', "
            f"'dualparal_core.engine', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5 []"
