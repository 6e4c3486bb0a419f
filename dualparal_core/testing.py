"""Tiny random stand-ins for the files users have (a Wan2.1 diffusion model, ComfyUI's umt5-xxl text encoder, the
Wan2.1 VAE), in the same on-disk layouts: for the tests, and for trying the headless path where real weights cannot
be downloaded (``python -m dualparal_core.testing DIR``, or ``bash scripts/run.sh tiny-files DIR``).

The umt5 file holds a sentencepiece model trained here on a few sentences (stored as ``spiece_model``, as in
ComfyUI's files) and random umt5 weights (d_model 64, 2 layers), saved plain (fp16) or as ComfyUI's scaled fp8
(e4m3fn Linear weights with a float32 ``scale_weight`` and a ``scaled_fp8`` marker). Its width matches
``WanConfig.tiny()``'s text width, so the three files work together.
"""

from __future__ import annotations

import io
import sys
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


def tiny_config(variant: str = "t2v", **kw):
    """``WanConfig.tiny(**kw)`` of one model variant (``experts.variant``): "t2v", "i2v" (Wan2.1 I2V: 36 input
    channels, img_emb and k_img/v_img), "flf2v" (+ emb_pos of 514 tokens) or "i2v_concat" (Wan2.2 I2V A14B: the 36
    channels only). The image models keep CLIP-vision's real width 1280."""
    from dataclasses import replace

    from .config import WanConfig

    image = {"t2v": {}, "i2v_concat": {"in_channels": 36}, "i2v": {"in_channels": 36, "image_dim": 1280},
             "flf2v": {"in_channels": 36, "image_dim": 1280, "image_pos_len": 514}}
    if variant not in image:
        raise ValueError(f"variant={variant!r} is not one of {list(image)}.")
    return replace(WanConfig.tiny(**kw), **image[variant])


def write_tiny_files(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """A tiny Wan model (ComfyUI layout, fp16), a scaled-fp8 umt5 and a small Wan VAE in ``folder``."""
    from safetensors.torch import save_file

    from .checkpoint import random_state_dict, save_checkpoint
    from .config import WanConfig
    from .headless.run import random_vae_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "wan_tiny_t2v.safetensors"
    save_checkpoint(random_state_dict(WanConfig.tiny(), seed=seed), str(model), "comfy", dtype=torch.float16)
    text, _ = write_tiny(folder, fp8=True, seed=seed)
    vae = folder / "wan_vae_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in random_vae_weights(seed).items()}, str(vae))
    return {"model": model, "text_encoder": text, "vae": vae}


if __name__ == "__main__":
    out = write_tiny_files(sys.argv[1] if len(sys.argv) > 1 else "out/tiny")
    for what, path in out.items():
        sys.stdout.write(f"{what}: {path}\n")
