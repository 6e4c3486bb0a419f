"""Wan LoRA files read from their safetensors header alone: which diffusers modules they change, checked against a
model shape before any process starts (the merge itself is :mod:`dualparal_core.lora`).

Layouts read (any of the prefixes ``diffusion_model.``, ``model.diffusion_model.``, ``transformer.``,
``base_model.model.`` or none):

* ComfyUI / original Wan: ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (also ``lora_A``/``lora_B`` with original module names, as musubi-tuner/DiffSynth write them);
* diffusers / PEFT: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (alpha optional);
* kohya: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
  ``lora_transformer_blocks_N_attn1_to_q`` with diffusers module names);
* full differences as ComfyUI reads them: ``X.diff`` (weight) and ``X.diff_b`` (bias).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dualparal_core import logger
from dualparal_core.config import WanConfig
from dualparal_core.files.wan import diffusers_key, expected_shapes, original_key, read_header

#: Prefixes in front of the module names, longest first.
PREFIXES: tuple[str, ...] = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
#: Key suffixes and what they hold.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
_KOHYA_RE = re.compile(r"^lora_(?:unet|transformer)_(.+)$")
_BLOCK_RE = re.compile(r"^blocks[._](\d+)[._](.+)$")


def _module_tables() -> tuple[dict[str, str], dict[str, str]]:
    """{underscored module name: diffusers module} for block modules (without ``blocks_N_``) and top-level ones,
    in both original and diffusers spelling (what kohya keys look like once ``lora_unet_`` is stripped)."""
    block, top = {}, {}
    for key in expected_shapes(WanConfig(dim=128, ffn_dim=128, num_layers=1, num_heads=1)):
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        orig = original_key(key)
        names = {module, orig[: -len(".weight")]} if orig else {module}
        m = _BLOCK_RE.match(module)
        for name in names:
            if m:
                table, rest = block, _BLOCK_RE.match(name).group(2)
                table[rest.replace(".", "_")] = m.group(2)
            else:
                top[name.replace(".", "_")] = module
    return block, top


_KOHYA_BLOCK, _KOHYA_TOP = _module_tables()


def _strip(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _diffusers_module(name: str) -> str | None:
    """The diffusers module (e.g. ``blocks.3.attn1.to_q``) a LoRA module name targets, or None.

    For a bare parameter (``blocks.N.modulation``, targeted by a ``.diff`` key) it is the parameter's name."""
    name = _strip(name)
    m = _KOHYA_RE.match(name)
    if m:
        rest = m.group(1)
        b = _BLOCK_RE.match(rest)
        if b:
            mod = _KOHYA_BLOCK.get(b.group(2))
            return None if mod is None else f"blocks.{b.group(1)}.{mod}"
        return _KOHYA_TOP.get(rest)
    for cand in (name + ".weight", name):  # a module (LoRA) or a parameter-like name (diff_b of a bias)
        d = diffusers_key(cand)
        if d is not None:
            return d[: -len(".weight")] if d.endswith(".weight") else d
        if original_key(cand) is not None:
            return name
    return None


@dataclass
class Target:
    """The file keys that change one diffusers module."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    diff: str | None = None
    diff_b: str | None = None


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says: which modules it changes, its rank(s), and what it left out."""

    path: str
    targets: dict[str, Target] = field(repr=False)
    """{diffusers module: file keys}."""
    ranks: tuple[int, ...]
    """Distinct ranks of its low-rank pairs."""
    unmatched: tuple[str, ...]
    """File keys that target nothing in a Wan T2V transformer (e.g. text-encoder or I2V-only parts)."""
    layout: str
    """"original", "diffusers", "kohya" or "diff" (how most of its keys are spelled)."""


def lora_plan(keys: Sequence[str], path: str = "<lora>") -> tuple[dict[str, Target], list[str], str]:
    """Group a LoRA's keys by the diffusers module they change: ({module: Target}, unmatched keys, layout)."""
    targets: dict[str, Target] = {}
    unmatched: list[str] = []
    votes: dict[str, int] = {}
    for key in keys:
        kind = next(((s, k) for s, k in _SUFFIXES if key.endswith(s)), None)
        if kind is None:
            unmatched.append(key)
            continue
        mod_name = key[: -len(kind[0])]
        module = _diffusers_module(mod_name)
        if module is None:
            unmatched.append(key)
            continue
        bare = _strip(mod_name)
        style = ("kohya" if bare.startswith("lora_") else "diff" if kind[1].startswith("diff")
                 else "original" if diffusers_key(bare + ".weight") or diffusers_key(bare) else "diffusers")
        votes[style] = votes.get(style, 0) + 1
        setattr(targets.setdefault(module, Target()), kind[1], key)
    broken = [m for m, t in targets.items() if (t.down is None) != (t.up is None)]
    if broken:
        raise ValueError(f"LoRA '{path}' has a down (A) matrix without its up (B) matrix or the reverse for "
                         f"{len(broken)} modules, e.g. {broken[:3]}; the file is incomplete.")
    layout = max(votes, key=votes.get) if votes else "none"
    return targets, unmatched, layout


def inspect_lora(path: str) -> LoraInfo:
    """Read only the header of a LoRA file; ValueError naming the file if it changes nothing in a Wan T2V model."""
    path = os.fspath(path)
    try:
        header = read_header(path)
    except ValueError as e:
        raise ValueError(f"LoRA '{path}' cannot be read as a .safetensors file: {e}") from e
    targets, unmatched, layout = lora_plan(list(header), path)
    if not targets:
        sample = ", ".join(repr(k) for k in list(header)[:4])
        raise ValueError(f"LoRA '{path}' matches nothing in a Wan T2V transformer: none of its {len(header)} keys "
                         f"(e.g. {sample}) names a Wan layer in the ComfyUI/original, diffusers/PEFT or kohya "
                         f"layout. Is it a LoRA for another model (SD, Flux, Hunyuan...)?")
    ranks = sorted({header[t.down][0][0] for t in targets.values() if t.down})
    return LoraInfo(path=path, targets=targets, ranks=tuple(ranks), unmatched=tuple(unmatched), layout=layout)


_IMAGE_ONLY = ("condition_embedder.image_embedder.", ".attn2.add_k_proj", ".attn2.add_v_proj", ".attn2.norm_added_k")


def _skip_image_parts(info: LoraInfo, want: dict) -> LoraInfo:
    """An I2V LoRA on a model without the image parts (img_emb, k_img/v_img): those keys change nothing and are
    ignored with the other unmatched keys, as ComfyUI's LoRA loader ignores keys its model lacks."""
    gone = {m: t for m, t in info.targets.items() if any(p in m or m.startswith(p) for p in _IMAGE_ONLY)
            and want.get(m + ".weight", want.get(m)) is None}
    if not gone:
        return info
    keys = tuple(k for t in gone.values() for k in (t.down, t.up, t.alpha, t.diff, t.diff_b) if k)
    return replace(info, targets={m: t for m, t in info.targets.items() if m not in gone},
                   unmatched=info.unmatched + keys)


def check_lora(path: str, config: WanConfig) -> LoraInfo:
    """Header-only pre-check against a model shape: every targeted layer exists and the shapes fit.

    Raises ValueError naming the file and what does not fit (e.g. a 14B LoRA on the 1.3B model).
    """
    info = inspect_lora(path)
    header = read_header(path)
    want = expected_shapes(config)
    info = _skip_image_parts(info, want)
    for module, t in info.targets.items():
        wshape = want.get(module + ".weight", want.get(module))
        if wshape is None and (t.down or t.diff):
            m = _BLOCK_RE.match(module)
            if m and int(m.group(1)) >= config.num_layers:
                raise ValueError(f"LoRA '{path}' changes block {m.group(1)} but the model has only "
                                 f"{config.num_layers} blocks: it was made for a larger Wan model.")
            raise ValueError(f"LoRA '{path}' changes {module}, which this Wan T2V model does not have.")
        if t.down:
            up, down = header[t.up][0], header[t.down][0]
            got = (up[0], *down[1:]) if len(down) > 2 else (up[0], down[1])
            if len(wshape) != len(got) or got[0] != wshape[0] or got[1] != wshape[1]:
                raise ValueError(
                    f"LoRA '{path}' has a {list(got)} update for {module} but the model's weight is {list(wshape)}: "
                    f"it was made for a Wan model of another size (the loaded one is {config.dim} wide, "
                    f"{config.num_layers} blocks).")
        for kind, suffix in (("diff", ".weight"), ("diff_b", ".bias")):
            key = getattr(t, kind)
            target = module if (kind == "diff" and module in want) else module + suffix
            if key and tuple(header[key][0]) != tuple(want.get(target, ())):
                raise ValueError(f"LoRA '{path}' has a {list(header[key][0])} difference for {target} "
                                 f"but the model's tensor is {list(want.get(target, ()))}.")
    if info.unmatched:
        logger.warning("LoRA %s: %d of its keys change nothing in a Wan T2V transformer and are ignored, e.g. %s",
                       os.path.basename(path), len(info.unmatched), list(info.unmatched[:3]))
    return info
