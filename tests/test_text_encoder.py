"""Prompts -> embeddings from ComfyUI's umt5 file layout: our tokens, dequantisation, padding/zeroing and encoder
output against sentencepiece, the formula and transformers run independently; and, under COMFYUI_PATH, against
ComfyUI's own tokenizer and T5 driven in-process with the tiny config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from umt5_tiny import CONFIG, LINEARS, reference_model, write_tiny  # noqa: E402

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

PROMPT = "a red fox jumps over the lazy dog in the snow"


@pytest.fixture(scope="module", params=[False, True], ids=["fp16", "fp8_scaled"])
def tiny(request, tmp_path_factory):
    path, spiece = write_tiny(tmp_path_factory.mktemp("umt5"), fp8=request.param)
    return path, spiece, request.param


def test_tokens_are_sentencepiece_then_end_then_pads_to_512(tiny):
    import sentencepiece

    from dualparal_core.text_encoder import Tokenizer

    path, spiece, _ = tiny
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    ids = sp.encode(PROMPT)
    assert [t for t, _ in Tokenizer(spiece)(PROMPT)] == ids + [1] + [0] * (512 - len(ids) - 1)
    assert all(w == 1.0 for _, w in Tokenizer(spiece)(PROMPT))
    long = " ".join([PROMPT] * 60)  # never truncated: longer than 512 tokens gives a longer sequence
    assert [t for t, _ in Tokenizer(spiece)(long)] == sp.encode(long) + [1]
    weighted = Tokenizer(spiece)("a (red fox:1.5) in (snow)")
    expect = ([(t, 1.0) for t in sp.encode("a ")] + [(t, 1.5) for t in sp.encode("red fox")] +
              [(t, 1.0) for t in sp.encode(" in ")] + [(t, pytest.approx(1.1)) for t in sp.encode("snow")])
    assert weighted[: len(expect) + 1] == expect + [(1, 1.0)]


def test_fp8_scaled_dequantisation_is_weight_times_scale(tiny):
    from safetensors.torch import load_file

    from dualparal_core.text_encoder import dequantised

    path, _, fp8 = tiny
    raw = load_file(str(path))
    ours = dict(dequantised(raw.__getitem__, list(raw), ""))
    assert "spiece_model" not in ours and "scaled_fp8" not in ours
    assert not any(k.endswith("scale_weight") for k in ours)
    for k, v in ours.items():
        if fp8 and k.endswith(LINEARS):
            assert raw[k].dtype == torch.float8_e4m3fn
            torch.testing.assert_close(v, raw[k].to(torch.float32) * raw[k[:-6] + "scale_weight"], rtol=0, atol=0)
        else:
            torch.testing.assert_close(v, raw[k].to(torch.float32), rtol=0, atol=0)


def _reference(path: Path, vocab: int, tmp_path: Path):
    """transformers' UMT5EncoderModel loaded another way: save_pretrained/from_pretrained of a model whose weights
    were set from the file with the formula written out here."""
    from safetensors.torch import load_file
    from transformers import UMT5EncoderModel

    raw = load_file(str(path))
    model = reference_model(vocab, seed=1)  # other values, overwritten below
    sd = {}
    for k in model.state_dict():
        src = "shared.weight" if k == "encoder.embed_tokens.weight" else k
        w = raw[src].float()
        if src[:-6] + "scale_weight" in raw:
            w = w * raw[src[:-6] + "scale_weight"].float()
        sd[k] = w
    model.load_state_dict(sd)
    model.save_pretrained(tmp_path / "ref")
    return UMT5EncoderModel.from_pretrained(tmp_path / "ref", torch_dtype=torch.float32).eval()


def test_encoder_output_matches_transformers_and_comfy_padding(tiny, tmp_path):
    import sentencepiece

    from dualparal_core.text_encoder import encode_prompts

    path, spiece, _ = tiny
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    ref = _reference(path, sp.get_piece_size(), tmp_path)
    ids = sp.encode(PROMPT) + [1]
    n = len(ids)
    tokens = torch.tensor([ids + [0] * (512 - n)])
    mask = torch.tensor([[1] * n + [0] * (512 - n)])
    with torch.no_grad():
        want = ref(input_ids=tokens, attention_mask=mask).last_hidden_state
    (z,) = encode_prompts(str(path), [PROMPT])
    assert z.shape == (1, 512, CONFIG["d_model"]) and z.dtype == torch.float32
    torch.testing.assert_close(z[:, :n], want[:, :n], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(z[:, n:]) == 0 and torch.all(z[:, :n].abs().sum(-1) > 0)


def test_weighted_prompt_moves_rows_from_the_empty_encoding(tiny):
    import sentencepiece

    from dualparal_core.text_encoder import encode_tokens, load_encoder

    path, spiece, _ = tiny
    model, tok = load_encoder(str(path))
    pairs = tok("a (red fox:1.5) in snow")
    plain = encode_tokens(model, [(t, 1.0) for t, _ in pairs])
    empty = encode_tokens(model, [(1, 1.0)] + [(0, 1.0)] * (len(pairs) - 1))
    got = encode_tokens(model, pairs)
    w = torch.tensor([w for _, w in pairs]).view(1, -1, 1)
    torch.testing.assert_close(got, torch.where(w != 1, (plain - empty) * w + empty, plain), rtol=0, atol=1e-6)
    assert not torch.equal(got, plain)
    assert sentencepiece  # the tokenizer above came from the file


def test_header_refusals(tmp_path):
    from safetensors.torch import save_file

    from dualparal_core.files.umt5 import inspect_text_encoder

    path, _ = write_tiny(tmp_path, fp8=False)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    save_file({k: v for k, v in sd.items() if k != "spiece_model"}, str(tmp_path / "nospiece.safetensors"))
    with pytest.raises(ValueError, match="no tokenizer"):
        inspect_text_encoder(str(tmp_path / "nospiece.safetensors"))
    save_file({k: v for k, v in sd.items() if "block.1.layer.0.SelfAttention.relative" not in k},
              str(tmp_path / "t5.safetensors"))
    with pytest.raises(ValueError, match="T5 encoder"):
        inspect_text_encoder(str(tmp_path / "t5.safetensors"))
    info = inspect_text_encoder(str(path))
    assert info.config == {**CONFIG, "vocab_size": sd["shared.weight"].shape[0], "relative_attention_num_buckets": 32}


# ---------------------------------------------------------------------------------------------- ComfyUI's own
def _comfy_encode(path: Path, text: str, fp8: bool) -> tuple[list, torch.Tensor]:
    """ComfyUI's UMT5XXlTokenizer (tokenizer from the file's spiece_model) and its SDClipModel/T5 with the tiny
    config, padding and zeroing as its wan.py sets them (its loader only recognises full-size umt5)."""
    from comfy_import import import_comfy

    sd1_clip, t5, wan = import_comfy("comfy.sd1_clip", "comfy.text_encoders.t5", "comfy.text_encoders.wan",
                                     why="ComfyUI's umt5 encoding")
    from safetensors.torch import load_file

    raw = load_file(str(path))
    tokenizer = wan.UMT5XXlTokenizer(tokenizer_data={"spiece_model": raw["spiece_model"]})
    config = {**CONFIG, "vocab_size": raw["shared.weight"].shape[0], "model_type": "umt5",
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True}
    dtype = torch.float8_e4m3fn if fp8 else torch.float16
    model = sd1_clip.SDClipModel(textmodel_json_config=config, dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                 model_class=t5.T5, enable_attention_masks=True, zero_out_masked=True,
                                 model_options={"scaled_fp8": dtype} if fp8 else {})
    missing, unexpected = model.load_sd({k: v for k, v in raw.items() if k != "spiece_model"})
    assert not [k for k in missing if "scale_input" not in k] and not unexpected, (missing, unexpected)
    tokens = tokenizer.tokenize_with_weights(text)
    with torch.no_grad():
        z, pooled = model.encode_token_weights(tokens)
    assert pooled is None
    return tokens, z


@pytest.mark.parametrize("text", [PROMPT, "a (red fox:1.5) in (snow)", ""])
def test_matches_comfyui_cliptextencode(tiny, text):
    from dualparal_core.text_encoder import encode_tokens, load_encoder

    path, _, fp8 = tiny
    tokens, want = _comfy_encode(path, text, fp8)
    model, tok = load_encoder(str(path))
    assert len(tokens) == 1 and tok(text) == [(t, pytest.approx(w)) for t, w in tokens[0]]
    got = encode_tokens(model, tok(text))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
