"""Pure bookkeeping of the DualParal block schedule: which block takes which step at which tick, in what order,
and which states each block-step reads (DESIGN §2). No torch, no torch.distributed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import BlockLayout


@dataclass(frozen=True)
class Item:
    """One block-step."""

    index: int
    """Position in the global issue order (every rank processes items in this order)."""
    tick: int
    """Tick t at which it runs."""
    block: int
    """Block j."""
    step: int
    """Denoising step s = t - j (0-based), taking the block from sigma[s] to sigma[s+1]."""
    right_ctx: bool
    """Whether the previous item is this block's next-newer neighbour in the same tick (its first frames are this
    block-step's right context, when ``right`` says they are used)."""
    expert: int = 0
    """The expert of this step (0: the only or the high-noise one, 1: the low-noise one)."""
    right: int = 0
    """Right-context frames this block-step attends to: the first min(K, r) frames of the next-newer block, as
    the previous item kept them; 0 without a neighbour, with K = 0, or when the neighbour ran the other expert
    (no keys of one expert ever meet the other's queries)."""
    keep: int = 0
    """Own frames (the first ones) whose K/V this block-step keeps for the next item: that item's ``right``."""


class Schedule:
    """The ordered block-steps of one video: ticks 0..n+S-2, blocks newest first within a tick."""

    def __init__(self, layout: BlockLayout, steps: int, experts: Sequence[int] | None = None):
        """``experts``: the expert of each step (default: one expert); right context passes only between
        block-steps of the same expert."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1.")
        experts = tuple(experts) if experts is not None else (0,) * steps
        if len(experts) != steps:
            raise ValueError(f"experts has {len(experts)} entries for {steps} steps; give one expert per step.")
        self.layout = layout
        self.steps = steps
        n = layout.num_blocks
        cells: list[tuple[int, int, bool, int]] = []  # (tick, block, right_ctx, right frames), in issue order
        for t in range(n + steps - 1):
            newest = min(t, n - 1)
            for j in range(newest, max(0, t - steps + 1) - 1, -1):
                s = t - j
                same = j != newest and experts[s - 1] == experts[s]  # the neighbour took step s - 1
                cells.append((t, j, j != newest, layout.right_context_frames(j + 1) if same else 0))
        self._index: dict[tuple[int, int], int] = {}
        items: list[Item] = []
        for i, (t, j, ctx, right) in enumerate(cells):
            keep = cells[i + 1][3] if i + 1 < len(cells) else 0  # the next item reads exactly what is kept
            items.append(Item(i, t, j, t - j, ctx, experts[t - j], right, keep))
            self._index[(j, t)] = i
        self.items: tuple[Item, ...] = tuple(items)

    @property
    def num_ticks(self) -> int:
        return self.layout.num_blocks + self.steps - 1

    def __len__(self) -> int:
        return len(self.items)

    def deps(self, item: Item) -> tuple[int, ...]:
        """Indices of the block-steps whose results must be in before ``item`` can be issued: the block's own
        previous step and the left neighbour's step of the previous tick (its state at the start of this tick)."""
        out = []
        if item.step > 0:
            out.append(self._index[(item.block, item.tick - 1)])
        if item.block > 0:
            out.append(self._index[(item.block - 1, item.tick - 1)])
        return tuple(out)

    def last_step_index(self, block: int) -> int:
        """Index of the item that finishes ``block``."""
        return self._index[(block, block + self.steps - 1)]

    def max_in_flight(self) -> int:
        """Largest number of blocks in flight at one tick (min(blocks, steps)): more ranks than this idle."""
        return min(self.layout.num_blocks, self.steps)
