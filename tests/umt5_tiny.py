"""The tiny umt5 of the text-encoder tests: it lives in dualparal_core/testing.py (the README's tiny files use it)."""

from dualparal_core.testing import (
    CONFIG,
    LINEARS,
    SENTENCES,
    comfy_state_dict,
    reference_model,
    train_spiece,
    write_tiny,
)

__all__ = ["CONFIG", "LINEARS", "SENTENCES", "comfy_state_dict", "reference_model", "train_spiece", "write_tiny"]
