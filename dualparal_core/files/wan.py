"""Wan transformer files read from their safetensors header alone: the key tables of every layout, the model shape
inferred from the tensor shapes, and the name rules (keep-in-fp32, fp8 targets) the loader and the stage share."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dualparal_core.config import ModelSource, WanConfig

PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
#: Modules whose weights stay float32 in every compute dtype (matched on name components), for the loader and the
#: stage alike: diffusers' ``WanTransformer3DModel._keep_in_fp32_modules`` less its "rope". That entry names
#: diffusers' ``WanRotaryPosEmbed``, whose tables are non-persistent buffers: no file holds a tensor under it and
#: our stage has no such module (``model.rope_tables`` computes the tables in float32 for each window).
KEEP_FP32: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

_WB, _W, _P, _OPT = ("weight", "bias"), ("weight",), ("",), ()
# (original module, diffusers module, params that must exist); _P = the name is itself a parameter; _OPT = the
# module may carry weight/bias but T2V files have none (norm1/norm2 of the original layout are not affine).
_TOP_MODULES = (
    ("patch_embedding", "patch_embedding", _WB),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1", _WB),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2", _WB),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1", _WB),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2", _WB),
    ("time_projection.1", "condition_embedder.time_proj", _WB),
    ("head.head", "proj_out", _WB),
    ("head.modulation", "scale_shift_table", _P),
)
_BLOCK_MODULES = (
    *((f"{o}.{a}", f"{d}.{b}", _WB) for o, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *((f"{o}.norm_{a}", f"{d}.norm_{a}", _W) for o, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a in ("q", "k")),
    ("norm3", "norm2", _WB),  # the cross-attention pre-norm: original norm3 is diffusers norm2 (and vice versa)
    ("norm2", "norm3", _OPT),
    ("norm1", "norm1", _OPT),
    ("ffn.0", "ffn.net.0.proj", _WB),
    ("ffn.2", "ffn.net.2", _WB),
    ("modulation", "scale_shift_table", _P),
)
# Image-to-video extras (Wan2.1 I2V / FLF2V, Fun-InP): the CLIP-vision projection and each block's image K/V.
# Optional in the tables: a file has all of them or none (expected_shapes checks against the inferred config).
_I2V_TOP = (
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1", _WB),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", _WB),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", _WB),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2", _WB),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed", _P),  # FLF2V only
)
_I2V_BLOCK = (
    ("cross_attn.k_img", "attn2.add_k_proj", _WB),
    ("cross_attn.v_img", "attn2.add_v_proj", _WB),
    ("cross_attn.norm_k_img", "attn2.norm_added_k", _W),
)


def _names(modules: tuple) -> list[tuple[str, str, bool]]:
    """(original name, diffusers name, required) for every parameter of a module table."""
    out = []
    for orig, diff, params in modules:
        for p in (params or _WB):
            out.append((f"{orig}.{p}" if p else orig, f"{diff}.{p}" if p else diff, bool(params)))
    return out


_TOP_O2D = {o: d for o, d, _ in _names(_TOP_MODULES + _I2V_TOP)}
_BLOCK_O2D = {o: d for o, d, _ in _names(_BLOCK_MODULES + _I2V_BLOCK)}
_TOP_D2O = {d: o for o, d in _TOP_O2D.items()}
_BLOCK_D2O = {d: o for o, d in _BLOCK_O2D.items()}
#: diffusers names every file must have, T2V and I2V (top level, and per block without the ``blocks.N.`` prefix).
REQUIRED_TOP = tuple(d for _, d, req in _names(_TOP_MODULES) if req)
REQUIRED_BLOCK = tuple(d for _, d, req in _names(_BLOCK_MODULES) if req)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_QUANT_AUX = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")
_DTYPES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8_e4m3fn",
           "F8_E5M2": "fp8_e5m2"}
# Keys of the model variants we refuse, and what to tell the user.
_VARIANTS = (
    ("vace_", "a VACE model (vace_* keys)"),
    ("control_adapter.", "a Wan camera-control model (control_adapter keys)"),
    ("face_adapter.", "a Wan Animate model (face_adapter keys)"),
    ("motion_encoder.", "a Wan Animate model (motion_encoder keys)"),
    ("audio", "a speech-to-video (S2V) model (audio keys)"),
    ("ref_conv.", "a Wan Fun reference-image model (ref_conv keys)"),
)
_T2V_HINT = ("DualParal supports Wan2.1 T2V (1.3B, 14B), Wan2.1 I2V 14B (480P/720P, Fun-InP) and FLF2V, and Wan2.2 "
             "T2V/I2V A14B (high/low noise) diffusion models.")


def diffusers_key(original: str) -> str | None:
    """The diffusers name of an original-Wan key (prefix already stripped), or None if it is not a Wan weight."""
    m = _BLOCK_RE.match(original)
    if m:
        d = _BLOCK_O2D.get(m.group(2))
        return None if d is None else f"blocks.{m.group(1)}.{d}"
    return _TOP_O2D.get(original)


def original_key(diffusers: str) -> str | None:
    """The original-Wan name of a diffusers key, or None if it is not a Wan weight."""
    m = _BLOCK_RE.match(diffusers)
    if m:
        o = _BLOCK_D2O.get(m.group(2))
        return None if o is None else f"blocks.{m.group(1)}.{o}"
    return _TOP_D2O.get(diffusers)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says: its model shape and how its tensors are named and stored."""

    path: str
    """The file."""
    config: WanConfig
    """Model shape inferred from the tensor shapes."""
    layout: str
    """Key names: "original" (Wan/ComfyUI) or "diffusers"."""
    prefix: str
    """Prefix stripped from every key ("" or e.g. "model.diffusion_model.")."""
    quant: str
    """"none", "fp8_scaled" (fp8 weights with per-tensor float32 scales) or "fp8" (plain fp8 weights)."""
    dtype: str
    """Storage dtype of the big weights, e.g. "bf16" or "fp8_e4m3fn"."""


def file_error(path: str, what: str) -> ValueError:
    """The error every refusal of a checkpoint file raises: its path, then what is wrong."""
    return ValueError(f"Checkpoint '{path}' {what}")


def read_index(path: str) -> tuple[dict[str, tuple[tuple[int, ...], str, int, int]], int]:
    """The header as {key: (shape, dtype string, start, end)} and the file offset where tensor data begins."""
    if path.lower().endswith(".gguf"):
        raise file_error(path, "is a GGUF file; GGUF is not supported. Use the .safetensors file of the same model.")
    if os.path.isdir(path):
        raise file_error(path, "is a folder; pick the single .safetensors file of the diffusion model.")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head[:4] == b"GGUF":
                raise file_error(path, "is a GGUF file; GGUF is not supported. Use the .safetensors file of the "
                                       "same model.")
            if len(head) < 8:
                raise file_error(path, f"is not a safetensors file: it is only {size} bytes long.")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 256 << 20):
                raise file_error(path, f"is not a safetensors file: its first 8 bytes {head!r} are not a valid header "
                                       f"length for a file of {size} bytes (truncated, or another format?).")
            raw = fh.read(n)
    except OSError as e:
        raise file_error(path, f"cannot be read: {e}") from e
    try:
        meta = json.loads(raw)
        items = {k: v for k, v in meta.items() if k != "__metadata__"}
        index = {k: (tuple(int(s) for s in v["shape"]), str(v["dtype"]), int(v["data_offsets"][0]),
                     int(v["data_offsets"][1])) for k, v in items.items()}
        end = max((e for *_, e in index.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise file_error(path, f"is not a safetensors file: its header is not valid safetensors JSON ({e}).") from e
    if 8 + n + end > size:
        raise file_error(path, f"is truncated: its header describes {8 + n + end} bytes but the file has only {size} "
                               f"(an interrupted download or copy?). Download it again.")
    return index, 8 + n


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Read only the safetensors header: {key: (shape, safetensors dtype string)}; ValueError if not readable."""
    return {k: v[:2] for k, v in read_index(os.fspath(path))[0].items()}


def _strip_prefix(keys: list[str]) -> str:
    for p in PREFIXES:
        if sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def _describe_other(keys: list[str]) -> str:
    """A guess at what a non-Wan-transformer file is, for the error message."""
    joined = " ".join(keys[:2000])
    if "lora_" in joined or ".alpha" in joined:
        return "it looks like a LoRA (use the DualParal LoRA node)"
    if "decoder.conv" in joined or "decoder.head" in joined or "encoder.conv1" in joined:
        return "it looks like a VAE (load it with the VAE loader)"
    if "shared.weight" in joined or "encoder.block." in joined or "token_embedding" in joined:
        return "it looks like a text encoder (load it with the CLIP/text-encoder loader)"
    sample = ", ".join(repr(k) for k in keys[:5])
    return f"it has {len(keys)} tensors such as {sample}"


def _config_from(shapes: Mapping[str, tuple[int, ...]], path: str) -> WanConfig:
    """Infer the model shape from diffusers-named tensor shapes (prefix stripped, quant keys removed)."""
    pe, q = shapes["patch_embedding.weight"], shapes["blocks.0.attn1.to_q.weight"]
    dim, in_ch, patch = pe[0], pe[1], tuple(pe[2:])
    idx = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
    num_layers = idx[-1] + 1
    if idx != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(idx))
        raise file_error(path, f"is incomplete: blocks {missing} are missing (of {num_layers}).")
    if len(pe) != 5 or q != (dim, dim):
        raise file_error(path, f"has a patch embedding of shape {list(pe)} and a q projection of shape {list(q)}; "
                               f"that is not a Wan transformer.")
    proj = shapes["proj_out.weight"][0]
    npatch = patch[0] * patch[1] * patch[2]
    out_ch = proj // npatch
    if out_ch == 48 or in_ch == 48:
        kind = "the Wan2.2 TI2V-5B model (Wan2.2 VAE)" if dim == 3072 else "a Fun/control model"
        raise file_error(path, f"has {in_ch} input / {out_ch} output latent channels (dim {dim}): it is {kind}, "
                               f"which is not supported. {_T2V_HINT}")
    if out_ch != 16 or in_ch not in (16, 36):
        raise file_error(path, f"has {in_ch} input / {out_ch} output latent channels; Wan T2V takes 16 in and I2V "
                               f"36 (16 + ComfyUI's 4 mask + 16 image channels), both 16 out. {_T2V_HINT}")
    has_img = "condition_embedder.image_embedder.norm1.weight" in shapes
    has_kv = "blocks.0.attn2.add_k_proj.weight" in shapes
    if has_img != has_kv or (has_img and in_ch != 36):
        raise file_error(path, f"has {'an' if has_img else 'no'} img_emb CLIP-vision projection, "
                               f"{'' if has_kv else 'no '}k_img/v_img image cross-attention and {in_ch} input "
                               f"channels: not a complete image-to-video layout (Wan2.1 I2V/FLF2V files have all "
                               f"three, with 36 channels; Wan2.2 I2V A14B files the 36 channels only). {_T2V_HINT}")
    pos = shapes.get("condition_embedder.image_embedder.pos_embed")
    if dim % 128:
        raise file_error(path, f"has model width {dim}, not a multiple of Wan's head dim 128; not a Wan T2V "
                               f"transformer.")
    return WanConfig(
        dim=dim, ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=num_layers, num_heads=dim // 128,
        in_channels=in_ch, out_channels=out_ch, text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1], patch_size=patch,
        image_dim=shapes["condition_embedder.image_embedder.norm1.weight"][0] if has_img else None,
        image_pos_len=pos[1] if has_img and pos is not None and len(pos) == 3 else None)


def expected_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of a diffusers ``WanTransformer3DModel`` state dict of this config."""
    d, f, pt, ph, pw = cfg.dim, cfg.ffn_dim, *cfg.patch_size
    top = {"patch_embedding.weight": (d, cfg.in_channels, pt, ph, pw), "patch_embedding.bias": (d,),
           "scale_shift_table": (1, 2, d), "proj_out.weight": (cfg.out_channels * pt * ph * pw, d),
           "proj_out.bias": (cfg.out_channels * pt * ph * pw,)}
    lin = {"condition_embedder.text_embedder.linear_1": (d, cfg.text_dim),
           "condition_embedder.text_embedder.linear_2": (d, d),
           "condition_embedder.time_embedder.linear_1": (d, cfg.freq_dim),
           "condition_embedder.time_embedder.linear_2": (d, d), "condition_embedder.time_proj": (6 * d, d)}
    lin.update({f"attn{a}.{p}": (d, d) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")})
    lin.update({"ffn.net.0.proj": (f, d), "ffn.net.2": (d, f)})
    per_block = {f"attn{a}.norm_{p}.weight": (d,) for a in (1, 2) for p in ("q", "k")}
    per_block.update({"norm2.weight": (d,), "norm2.bias": (d,), "scale_shift_table": (1, 6, d)})
    for name, shape in lin.items():
        target = top if name.startswith("condition_embedder") else per_block
        target[f"{name}.weight"], target[f"{name}.bias"] = shape, (shape[0],)
    if cfg.image_dim is not None:
        e, img = cfg.image_dim, "condition_embedder.image_embedder."
        top.update({f"{img}norm1.weight": (e,), f"{img}norm1.bias": (e,), f"{img}ff.net.0.proj.weight": (e, e),
                    f"{img}ff.net.0.proj.bias": (e,), f"{img}ff.net.2.weight": (d, e), f"{img}ff.net.2.bias": (d,),
                    f"{img}norm2.weight": (d,), f"{img}norm2.bias": (d,)})
        if cfg.image_pos_len is not None:
            top[f"{img}pos_embed"] = (1, cfg.image_pos_len, e)
        per_block.update({f"attn2.{p}.{w}": (d, d) if w == "weight" else (d,)
                          for p in ("add_k_proj", "add_v_proj") for w in ("weight", "bias")})
        per_block["attn2.norm_added_k.weight"] = (d,)
    for i in range(cfg.num_layers):
        top.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return top


@dataclass(frozen=True)
class Source:
    """The file key of one diffusers-named tensor, and of its fp8 scale when it has one."""

    key: str
    scale: str | None


def _map_keys(header: Mapping[str, tuple[tuple[int, ...], str]], path: str) -> tuple[str, str, dict[str, Source]]:
    """Refuse other model variants, find prefix and layout, and map diffusers name -> file key (+ its fp8 scale)."""
    keys = list(header)
    prefix = _strip_prefix(keys)
    names = {k[len(prefix):] if prefix and k.startswith(prefix) else k: k for k in keys}
    for n in [n for n in names if n.split(".")[-1] == "scaled_fp8"]:  # the marker, prefixed or not
        del names[n]
    for needle, what in _VARIANTS:
        hit = next((k for k in names if needle in k), None)
        if hit is not None:
            raise file_error(path, f"is {what}, e.g. {hit!r}. {_T2V_HINT}")
    if "head.modulation" in names or "blocks.0.self_attn.q.weight" in names:
        layout, rename = "original", diffusers_key
    elif "scale_shift_table" in names or "blocks.0.attn1.to_q.weight" in names:
        layout, rename = "diffusers", (lambda k: k if original_key(k) is not None else None)
    else:
        raise file_error(path, f"is not a Wan transformer: {_describe_other(keys)}. {_T2V_HINT}")
    plan: dict[str, Source] = {}
    unknown = []
    for n in names:
        if n.endswith(_QUANT_AUX):
            continue
        d = rename(n)
        if d is None:
            unknown.append(n)
            continue
        base = n[:-len("weight")] if n.endswith(".weight") else None
        scale = next((names[base + s] for s in ("scale_weight", "weight_scale") if base and base + s in names), None)
        plan[d] = Source(names[n], scale)
    if unknown:
        raise file_error(path, f"has {len(unknown)} tensors that are not part of a Wan T2V/I2V transformer, e.g. "
                               f"{unknown[:5]}. {_T2V_HINT}")
    missing = [k for k in REQUIRED_TOP + tuple(f"blocks.0.{b}" for b in REQUIRED_BLOCK) if k not in plan]
    if missing:
        raise file_error(path, f"is not a complete Wan transformer ({layout} key names): missing {missing[:6]}.")
    odd = sorted({header[s.key][1] for s in plan.values()} - set(_DTYPES))
    if odd:
        raise file_error(path, f"stores weights as {odd}; only fp32/fp16/bf16 and fp8 (e4m3fn/e5m2, optionally scaled) "
                               f"files are supported (not NVFP4/int8/GGUF-style quantisations).")
    return prefix, layout, plan


def plan(header: Mapping[str, tuple[tuple[int, ...], str]], path: str) -> tuple[CheckpointInfo, dict[str, Source]]:
    """Classify a header: refusals, prefix, layout, quantisation, config, and diffusers name -> file key(s)."""
    prefix, layout, plan = _map_keys(header, path)
    shapes = {d: header[s.key][0] for d, s in plan.items()}
    cfg = _config_from(shapes, path)
    want = expected_shapes(cfg)
    bad = [f"{k} {list(shapes.get(k, ()))} (expected {list(v)})" for k, v in want.items() if shapes.get(k) != v]
    bad += [f"{k} (not expected)" for k in shapes if k not in want]
    if bad:
        raise file_error(path, f"has tensors that are missing or of the wrong shape for a {cfg.dim}-wide, "
                               f"{cfg.num_layers}-layer Wan model with {cfg.in_channels} input channels: {bad[:4]}.")
    big = header[plan["blocks.0.ffn.net.0.proj.weight"].key][1]
    has_marker = any(k.split(".")[-1] == "scaled_fp8" for k in header)
    is_fp8 = any(header[s.key][1].startswith("F8") for s in plan.values())
    quant = "fp8_scaled" if has_marker or any(s.scale for s in plan.values()) else ("fp8" if is_fp8 else "none")
    info = CheckpointInfo(path=path, config=cfg, layout=layout, prefix=prefix, quant=quant, dtype=_DTYPES[big])
    return info, plan


def info_from_header(header: Mapping[str, tuple[tuple[int, ...], str]], path: str = "<header>") -> CheckpointInfo:
    """Classify a {key: (shape, dtype string)} header without a file (pure; used by inspect and tests)."""
    return plan(header, path)[0]


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Read only the header of ``path`` and say what it holds; ValueError naming the file if it is unusable."""
    path = os.fspath(path)
    return plan(read_header(path), path)[0]


def keeps_fp32(name: str) -> bool:
    """Whether a diffusers-named tensor stays float32 in every compute dtype (see KEEP_FP32)."""
    return any(part in KEEP_FP32 for part in name.split("."))


def fp8_target(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a diffusers-named tensor is stored/kept in fp8 (fp8 files, ``weights="fp8"``): the blocks' Linear
    weights, the bulk of the model; embeddings, norms, modulation and head stay in higher precision."""
    return name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2


def in_stage(name: str, layers: range, embed: bool, head: bool) -> bool:
    """Whether a diffusers-named tensor belongs to a stage of ``layers`` (+ patch embedding, + head): every stage
    holds the condition embedder, rank 0 the patch embedding, the last rank ``proj_out`` and ``scale_shift_table``."""
    m = _BLOCK_RE.match(name)
    if m:
        return int(m.group(1)) in layers
    if name.startswith("condition_embedder."):
        return True
    if name.startswith("patch_embedding."):
        return embed
    return head  # proj_out.*, scale_shift_table


def check_source(source: ModelSource) -> tuple[ModelSource, WanConfig]:
    """The source with absolute paths and its model shape; refuses a missing file, and an expert pair whose two
    models differ in shape (a sentence naming both files)."""
    if source.path is None:
        return source, source.random_config
    paths, configs = [], []
    for p in (source.path, source.low_noise_path):
        if p is None:
            continue
        path = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if not os.path.isfile(path):
            raise ValueError(f"Checkpoint '{path}' does not exist; check the model path.")
        paths.append(path)
        configs.append(inspect_checkpoint(path).config)
    if len(configs) == 2 and configs[0] != configs[1]:
        a, b = configs
        raise ValueError(
            f"The two experts differ in shape: high-noise '{paths[0]}' is {a.dim} wide with {a.num_layers} layers "
            f"(ffn {a.ffn_dim}), low-noise '{paths[1]}' is {b.dim} wide with {b.num_layers} layers (ffn "
            f"{b.ffn_dim}). Both must be models of one Wan2.2 A14B pair (or any two models of the same shape).")
    return replace(source, path=paths[0], low_noise_path=paths[1] if len(paths) == 2 else None), configs[0]
