"""A tiny umt5 text encoder in ComfyUI's file layout, built in the test: a sentencepiece model trained here on a
few sentences (stored as ``spiece_model``), random umt5 weights (d_model 64, 2 layers), saved plain (fp16) or as
ComfyUI's scaled fp8 (e4m3fn Linear weights with a float32 ``scale_weight`` and a ``scaled_fp8`` marker)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

SENTENCES = [
    "a fox moving quickly in a beautiful winter scenery",
    "a red fox jumps over the lazy dog in the snow",
    "the camera pans slowly across a snowy forest at dawn",
    "a cat sleeps on a warm windowsill in the afternoon sun",
    "waves crash on a rocky beach under a stormy sky",
    "a small boat drifts on a calm lake surrounded by mountains",
    "children play football in a green park with tall trees",
    "a city street at night with neon lights and rain",
    "bright colours, overexposed, static, blurred details, subtitles",
    "an old man reads a newspaper on a wooden bench",
]
CONFIG = dict(d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2)
LINEARS = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def train_spiece() -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=120, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def reference_model(vocab: int, seed: int = 0):
    """transformers' UMT5EncoderModel of the tiny shape with seeded random weights (norms and biases too)."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**CONFIG, vocab_size=vocab, feed_forward_proj="gated-gelu_pytorch_tanh",
                     is_encoder_decoder=False, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "layer_norm" in name else 0.0, 0.2 if "layer_norm" in name else 0.5)
    return model


def comfy_state_dict(model, spiece: bytes, fp8: bool) -> dict[str, torch.Tensor]:
    """The model's tensors under ComfyUI's names: fp16, or scaled fp8 (amax / 448 per Linear weight; every other
    tensor stored in fp8 as well, so that a reader that casts to fp8 sees the same values)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    out: dict[str, torch.Tensor] = {"spiece_model": torch.frombuffer(bytearray(spiece), dtype=torch.uint8)}
    for k, v in sd.items():
        if not fp8:
            out[k] = v.half()
        elif k.endswith(LINEARS):
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.float().reshape(())
        else:
            out[k] = v.to(torch.float8_e4m3fn)
    if fp8:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_tiny(folder: Path, fp8: bool, seed: int = 0) -> tuple[Path, bytes]:
    """(the file, the sentencepiece model bytes)."""
    import sentencepiece
    from safetensors.torch import save_file

    spiece = train_spiece()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    path = folder / f"umt5_tiny_{'fp8_e4m3fn_scaled' if fp8 else 'fp16'}.safetensors"
    save_file(comfy_state_dict(reference_model(vocab, seed), spiece, fp8), str(path))
    return path, spiece
