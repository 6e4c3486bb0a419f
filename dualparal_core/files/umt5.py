"""umt5 text-encoder files as ComfyUI ships them (``umt5_xxl_fp8_e4m3fn_scaled`` / ``_fp16``), read from the
safetensors header alone: the encoder's shape, the storage (fp8 with scales or plain) and the tokenizer inside."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dualparal_core.files.wan import read_header

#: The serialized sentencepiece model ComfyUI stores inside its text-encoder files (a uint8 tensor).
SPIECE_KEY = "spiece_model"
_FINAL = "encoder.final_layer_norm.weight"
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")


@dataclass(frozen=True)
class UMT5Info:
    """What a umt5 file's header says."""

    path: str
    prefix: str
    """Prefix before ``encoder.``/``shared.`` in every key ("" in ComfyUI's files)."""
    config: dict
    """transformers' UMT5Config fields: d_model, d_kv, num_heads, d_ff, num_layers, vocab_size."""
    quant: str
    """"fp8_scaled" (fp8 weights with per-tensor ``scale_weight``) or "none"."""
    tokenizer_bytes: int
    """Size of the stored sentencepiece model."""


def _error(path: str, what: str) -> ValueError:
    return ValueError(f"text encoder '{path}' {what}")


def _shape(header: dict, key: str, path: str) -> tuple[int, ...]:
    if key not in header:
        raise _error(path, f"has no tensor '{key}': it is not a umt5-xxl encoder (use ComfyUI's "
                           f"umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors).")
    return header[key][0]


def info_from_header(header: dict, path: str = "<header>") -> UMT5Info:
    """The encoder's shape from its tensor shapes; refuses files without a tokenizer or of another family."""
    finals = [k for k in header if k.endswith(_FINAL)]
    if not finals:
        raise _error(path, f"has no '{_FINAL}': it is not a T5/umt5 text encoder (use ComfyUI's "
                           f"umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors).")
    p = finals[0][: -len(_FINAL)]
    spiece = header.get(SPIECE_KEY) or header.get(p + SPIECE_KEY)
    if spiece is None or spiece[1] not in ("U8", "I8"):
        raise _error(path, f"holds no tokenizer (no uint8 tensor '{SPIECE_KEY}'); the headless CLI reads the "
                           f"tokenizer from ComfyUI's umt5_xxl_*.safetensors files, which carry it.")
    vocab, d_model = _shape(header, p + "shared.weight", path)
    layers = 1 + max(int(m.group(1)) for k in header if (m := _BLOCK.match(k[len(p):])))
    att = p + "encoder.block.{}.layer.0.SelfAttention."
    buckets, heads = _shape(header, att.format(0) + "relative_attention_bias.weight", path)
    if layers > 1 and att.format(1) + "relative_attention_bias.weight" not in header:
        raise _error(path, "is a T5 encoder (one position bias), not umt5 (one per layer): Wan needs umt5-xxl.")
    inner = _shape(header, att.format(0) + "q.weight", path)[0]
    d_ff = _shape(header, p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", path)[0]
    quant = "fp8_scaled" if any(k.endswith(".scale_weight") for k in header) else "none"
    config = dict(d_model=d_model, d_kv=inner // heads, num_heads=heads, d_ff=d_ff, num_layers=layers,
                  vocab_size=vocab, relative_attention_num_buckets=buckets)
    return UMT5Info(path=path, prefix=p, config=config, quant=quant, tokenizer_bytes=spiece[0][0])


def inspect_text_encoder(path: str) -> UMT5Info:
    """Read ``path``'s header (ValueError with a sentence if it is not a umt5 file ComfyUI would load)."""
    try:
        header = read_header(path)
    except ValueError as e:
        raise _error(path, str(e).split("' ", 1)[-1]) from None
    return info_from_header(header, path)
