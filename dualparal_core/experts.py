"""The model one rank runs: one :class:`~dualparal_core.model.WanStage`, or the two experts of Wan2.2 A14B.

Wan2.2-T2V-A14B is two Wan2.1-14B-shaped transformers: the high-noise expert denoises while sigma >= boundary
(0.875 for T2V), the low-noise expert after. Blocks at different noise levels are in flight at once, so every rank
holds its layer slice of both (rank 0 both patch embeddings, the last rank both heads, every rank both condition
embedders), and each block-step picks its expert from its own sigma: every rank computes the same choice from the
job's sigma table, with no extra communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the Loader reads default_boundary at ComfyUI start-up: no model code (nor diffusers) then
    from .model import WanStage

HIGH, LOW = 0, 1
#: The boundary sigma Wan2.2 ships for its A14B pairs: T2V 0.875, I2V 0.900 (``boundary`` in
#: wan/configs/wan_t2v_A14B.py and wan/configs/wan_i2v_A14B.py of github.com/Wan-Video/Wan2.2, read at 42bf4cf).
BOUNDARY_T2V, BOUNDARY_I2V = 0.875, 0.900


def variant(config) -> str:
    """"t2v", "i2v" (Wan2.1 I2V), "flf2v" (img_emb.emb_pos) or "i2v_concat" (no img_emb: Wan2.2 I2V A14B)."""
    image = "i2v_concat" if config.image_dim is None else "i2v" if config.image_pos_len is None else "flf2v"
    return image if config.concat_channels else "t2v"


def default_boundary(config) -> float:
    """The boundary for a pair of this shape: I2V files (36 input channels) take Wan2.2 I2V's, others T2V's."""
    return BOUNDARY_I2V if config.concat_channels else BOUNDARY_T2V


class Experts:
    """One stage (``len(stages) == 1``) or a (high-noise, low-noise) pair of stages of the same layers."""

    def __init__(self, stages: Sequence[WanStage], boundary: float = 0.875):
        if len(stages) not in (1, 2):
            raise ValueError(f"a rank runs one or two experts, got {len(stages)}.")
        a = stages[0]
        for b in stages[1:]:
            if (b.config, b.layers, b.has_embed, b.has_head, b.dtype) != (a.config, a.layers, a.has_embed,
                                                                           a.has_head, a.dtype):
                raise ValueError("the two experts' stages differ in shape, layers or dtype; both experts must be "
                                 "models of the same shape.")
        self.stages = tuple(stages)
        self.boundary = float(boundary)

    # the stage interface the engine and the worker read
    @property
    def config(self):
        return self.stages[0].config

    @property
    def layers(self) -> range:
        return self.stages[0].layers

    @property
    def has_embed(self) -> bool:
        return self.stages[0].has_embed

    @property
    def has_head(self) -> bool:
        return self.stages[0].has_head

    @property
    def dtype(self):
        return self.stages[0].dtype

    @property
    def device(self):
        return self.stages[0].device

    def __len__(self) -> int:
        return len(self.stages)

    def expert(self, sigma: float) -> int:
        """Which expert takes a block-step at ``sigma``: HIGH (also the only one) or LOW."""
        return HIGH if len(self.stages) == 1 or float(sigma) >= self.boundary else LOW

    def blocks_forward(self, h, tproj, text, grid, right=None, keep=None, expert: int = HIGH, out_from: int = 0):
        """:meth:`WanStage.blocks_forward` of one expert (one call per block-step: the worker wraps it)."""
        return self.stages[expert].blocks_forward(h, tproj, text, grid, right=right, keep=keep, out_from=out_from)


def as_experts(model: WanStage | Experts) -> Experts:
    return model if isinstance(model, Experts) else Experts((model,))
