"""Prompts -> Wan text embeddings as ComfyUI's ``CLIPLoader(type=wan)`` + ``CLIPTextEncode`` give them, from the
same umt5 file (its sentencepiece model is stored inside), with transformers' ``UMT5EncoderModel``.

ComfyUI's recipe (``comfy/text_encoders/wan.py``, ``t5.py``, ``sd1_clip.py``): the prompt's ``(text:weight)``
segments are tokenized one by one without an end token; then one end token (1) and pad tokens (0) up to 512
(``min_length``; a longer prompt is never truncated). The attention mask is 1 up to and including the first end
token; the encoder runs in float32 (fp8 ``scale_weight``-scaled Linear weights dequantised as ``w.float() * s``),
its output's masked rows are zeroed (``zero_out_masked``), and a weight w != 1 moves a token's row to
``(z - z_empty) * w + z_empty``, ``z_empty`` being the encoding of an empty prompt of the same length.
"""

from __future__ import annotations

import gc
import re

import torch

from dualparal_core.files.umt5 import SPIECE_KEY, UMT5Info, inspect_text_encoder
from dualparal_core.headless.progress import bar

END, PAD = 1, 0
#: ComfyUI pads every umt5 prompt to at least this many tokens (UMT5XXlTokenizer's min_length).
MIN_LENGTH = 512


def _segments(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's prompt-weight grammar: top-level ``(...)`` groups multiply the weight by 1.1, ``(text:w)`` sets
    it; nesting recurses; unbalanced parentheses are kept as text."""
    parts, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0 and cur:
                parts.append(cur)
                cur = ""
            cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(cur + ")")
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        parts.append(cur)
    out: list[tuple[str, float]] = []
    for part in parts:
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, w = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w, inner = float(inner[colon + 1:]), inner[:colon]
                except ValueError:
                    pass
            out += _segments(inner, w)
        else:
            out.append((part, weight))
    return out


class Tokenizer:
    """The umt5 sentencepiece model stored in the file, used as ComfyUI's ``UMT5XXlTokenizer`` uses it."""

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto, add_bos=False, add_eos=False)

    def __call__(self, text: str, min_length: int = MIN_LENGTH) -> list[tuple[int, float]]:
        """(token, weight) pairs: the prompt's tokens, the end token, pads up to ``min_length``."""
        text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
        tokens: list[tuple[int, float]] = []
        for segment, weight in _segments(text):
            segment = segment.replace("\0\1", ")").replace("\0\2", "(")
            pieces = re.split(" embedding:|\nembedding:", segment)
            words = [pieces[0]] + [f"embedding:{p}" for p in pieces[1:]]
            for word in (w for w in words if w):
                tokens += [(t, weight) for t in self.sp.encode(word)]
        tokens.append((END, 1.0))
        return tokens + [(PAD, 1.0)] * max(0, min_length - len(tokens))


def mask_of(ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including each row's first end token, 0 after it (ComfyUI's ``process_tokens``)."""
    seen = (ids == END).long().cumsum(-1)
    return ((seen == 0) | ((seen == 1) & (ids == END))).long()


def umt5_config(info: UMT5Info):
    from transformers import UMT5Config

    return UMT5Config(**info.config, feed_forward_proj="gated-gelu_pytorch_tanh", is_encoder_decoder=False,
                      dropout_rate=0.0, layer_norm_epsilon=1e-6, relative_attention_max_distance=128)


def weight_keys(keys: list[str], prefix: str) -> list[str]:
    """The keys that are the encoder's own tensors (not scales, markers or the tokenizer)."""
    return [k for k in keys if k.startswith(prefix) and not k.endswith((".scale_weight", ".scale_input"))
            and k[len(prefix):] not in ("scaled_fp8", SPIECE_KEY)]


def dequantised(get, keys: list[str], prefix: str, dtype: torch.dtype = torch.float32):
    """(name, tensor) of the encoder's weights in ``dtype``: a Linear weight with a ``scale_weight`` is
    ``weight.float() * scale_weight`` (ComfyUI's scaled-fp8 Linear); every other tensor is cast."""
    present = set(keys)
    for key in weight_keys(keys, prefix):
        name = key[len(prefix):]
        w = get(key).to(torch.float32)
        scale = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        if scale in present and name.startswith("encoder.block."):
            w = w * get(scale).to(torch.float32)
        yield name, w.to(dtype)


def load_encoder(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(UMT5EncoderModel with the file's weights on ``device``, Tokenizer); built on meta, loaded tensor by
    tensor (no second copy), with a bar of tensors loaded."""
    from safetensors import safe_open
    from transformers import UMT5EncoderModel

    info = inspect_text_encoder(path)
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(info))
    sd = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        spiece = f.get_tensor(SPIECE_KEY if SPIECE_KEY in keys else info.prefix + SPIECE_KEY)
        loading = bar("loading text encoder", len(weight_keys(keys, info.prefix)), "tensor")
        for name, w in dequantised(f.get_tensor, keys, info.prefix, dtype):
            sd[name] = w.to(device)
            loading.update(1)
        loading.close()
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or unexpected:
        raise ValueError(f"text encoder '{path}': tensors missing {left[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False), Tokenizer(spiece.numpy().tobytes())


@torch.no_grad()
def encode_tokens(model, pairs: list[tuple[int, float]]) -> torch.Tensor:
    """[1, L, d_model] float32 on the CPU, as ComfyUI's ``encode_token_weights`` for one section."""
    dev = next(model.parameters()).device
    rows = [[t for t, _ in pairs]]
    weighted = any(w != 1.0 for _, w in pairs)
    if weighted:  # ComfyUI's gen_empty_tokens: end, then pads, as long as the prompt
        rows.append([END] + [PAD] * (len(pairs) - 1))
    ids = torch.tensor(rows, device=dev)
    mask = mask_of(ids)
    z = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    z = z * mask.unsqueeze(-1).float()
    out = z[0:1].clone()
    if weighted:
        w = torch.tensor([w for _, w in pairs], device=dev, dtype=torch.float32).view(1, -1, 1)
        out = torch.where(w != 1.0, (out - z[1:2]) * w + z[1:2], out)
    return out.cpu()


def encode_prompts(path: str, prompts: list[str], device: str = "cpu") -> list[torch.Tensor]:
    """Encode each prompt once, then free the encoder (before the workers load the diffusion model)."""
    model, tokenizer = load_encoder(path, device)
    try:
        encoding = bar("encoding text", len(prompts), "prompt")
        out = []
        for p in prompts:
            out.append(encode_tokens(model, tokenizer(p)))
            encoding.update(1)
        encoding.close()
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out
