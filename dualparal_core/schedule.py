"""Pure bookkeeping of the DualParal block schedule: which block takes which step at which tick, in what order,
and which states each block-step reads (DESIGN §2). No torch, no torch.distributed."""

from __future__ import annotations

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
    """Whether the previous item (the next-newer block, same tick) left a right-context cache for this one."""


class Schedule:
    """The ordered block-steps of one video: ticks 0..n+S-2, blocks newest first within a tick."""

    def __init__(self, layout: BlockLayout, steps: int):
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1.")
        self.layout = layout
        self.steps = steps
        n = layout.num_blocks
        items: list[Item] = []
        self._index: dict[tuple[int, int], int] = {}
        for t in range(n + steps - 1):
            newest = min(t, n - 1)
            for j in range(newest, max(0, t - steps + 1) - 1, -1):
                it = Item(len(items), t, j, t - j, right_ctx=(j != newest))
                self._index[(j, t)] = it.index
                items.append(it)
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
