"""One rank's job loop over the DualParal schedule; with one rank it is the single-process reference engine.

Rank 0 holds the latents, embeds each block-step's input window, runs its layers and the per-block sampler steps;
middle ranks run their layers; the last rank applies the head and CFG and returns the velocity of the block's own
frames to rank 0. Every rank walks :class:`~dualparal_core.schedule.Schedule` items in the same order, which is what
lets each keep the right-context K/V of the previous item locally (it never leaves the rank that owns the layers).

Two experts (Wan2.2 A14B, :mod:`~dualparal_core.experts`): each item runs the expert of its step's sigma, with that
expert's guidance scale, so the batch (2 with CFG, 1 without) may change from one item to the next; every rank
derives both from the schedule. The right-context cache only passes between items of the same expert (each
:class:`~dualparal_core.schedule.Item` says how many frames it reads and keeps): the one
block-step of each block that is the first on the low-noise expert (its newer neighbour is still on the high-noise
one) runs without right context — no keys of one expert ever meet the other's queries.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

import torch

from . import kvcache
from .comm import HEADER_STOP, Pipe
from .conditioning import JobImage
from .experts import Experts, as_experts
from .model import WanStage
from .noise import initial_noise
from .protocol import Job
from .samplers import make_sampler
from .schedule import Item, Schedule
from .timeline import TextBank

#: progress(done_block_steps, total_block_steps, x0_preview_or_None)
ProgressFn = Callable[[int, int, "torch.Tensor | None"], None]


class JobCancelled(Exception):
    """The job was cancelled; the group is idle and ready for the next one."""


class RankEngine:
    """Runs jobs on one rank. ``pipe`` is None for a single process owning every layer."""

    def __init__(self, stage: WanStage | Experts, pipe: Pipe | None = None, max_in_flight: int | None = None):
        self.model = as_experts(stage)
        self.pipe = pipe
        self.rank = 0 if pipe is None else pipe.rank
        self.world = 1 if pipe is None else pipe.world
        if (self.rank == 0) != self.model.has_embed or (self.rank == self.world - 1) != self.model.has_head:
            raise ValueError("stage/rank mismatch: rank 0 must hold the embedding and the last rank the head.")
        # One block-step more than there are stages: with uneven block-step costs (with/without right context) a
        # window of exactly N leaves rank 0 idle while the last rank finishes an expensive step; N + 1 removes most
        # of that (benchmarks/bubbles.py: S1 on 2 GPUs 1.86x -> 1.92x) for one extra hidden-state buffer.
        self.max_in_flight = max_in_flight or (self.world + 1 if self.world > 1 else 1)
        self.jobs_run = 0
        # Pre-warm (see _prewarm): on by default where it matters, GPU ranks of a pipeline
        self.prewarm = self.world > 1 and self.model.device.type == "cuda"
        self.warmed: set[tuple] = set()
        # Benchmarks measure the shipped path through these environment switches (read once, here):
        # DUALPARAL_PROFILE=1 fills last_profile after every job, which the rank program adds to its result;
        # DUALPARAL_MEMORY_CAP_GIB caps this rank's CUDA allocator (emulating a smaller card);
        # DUALPARAL_TRACE=DIR writes checksums of every compiled call (dualparal_core/trace.py).
        self.profile = os.environ.get("DUALPARAL_PROFILE", "") == "1"
        self.last_profile: dict = {}  # {} unless profiling; else {"profile": {...}}, keys in _profile_end
        self._marks: list | None = None
        self._memory = self._cap_memory(os.environ.get("DUALPARAL_MEMORY_CAP_GIB", ""))
        if os.environ.get("DUALPARAL_TRACE"):
            from .trace import install_trace

            install_trace(self, os.environ["DUALPARAL_TRACE"])

    # ------------------------------------------------------------------ job set-up (every rank)
    def _prepare(self, job: Job) -> None:
        sc = job.sampling
        self.job, self.sc = job, sc
        self.layout = sc.layout(job.shape[2])
        # per step: its expert; per expert: guidance scale and batch (2 with CFG); text K/V per prompt (TextBank)
        self.expert = [self.model.expert(s) for s in sc.sigmas[:-1]]
        self.schedule = Schedule(self.layout, sc.steps, self.expert)  # each item's expert, right and keep frames
        self.cfg = [sc.guidance(e) for e in range(len(self.model))]
        self.batch = [2 if c != 1.0 else 1 for c in self.cfg]
        self.image = JobImage(job.image, self.model.config, self.rank)  # I2V: concat windows (rank 0 only)
        for e in sorted(set(self.expert)):
            if self.batch[e] == 2 and job.uncond is None:
                raise ValueError(f"cfg{'_low' if e else ''}={self.cfg[e]} needs a negative conditioning; connect "
                                 f"one or set it to 1.0.")
        self.text = TextBank(self.model, job, self.schedule, self.batch)  # built lazily, freed after last use
        pt, ph, pw = self.model.config.patch_size
        self.hw = (job.shape[3] // ph) * (job.shape[4] // pw)
        self.grid_hw = (job.shape[3] // ph, job.shape[4] // pw)
        self._tcache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._right = None

    def _temb(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Modulation for a step's timestep (sigma * 1000), computed once per job and step on every rank."""
        if step not in self._tcache:
            e = self.expert[step]
            t = torch.full((self.batch[e],), float(self.sc.sigmas[step]) * 1000.0, dtype=torch.float32)
            self._tcache[step] = self.model.stages[e].time_embed(t)
        return self._tcache[step]

    def _window(self, item: Item) -> tuple[int, int, int]:
        """(input frames, left-context frames, own frames) of an item's window."""
        s0, e0 = self.layout.input_span(item.block)
        own_s, own_e = self.layout.blocks[item.block]
        return e0 - s0, own_s - s0, own_e - own_s

    def _layers(self, item: Item, h: torch.Tensor) -> torch.Tensor:
        """This rank's layers for one item, reading and leaving the right-context cache."""
        frames, _, _ = self._window(item)
        right, self._right = self._right, None  # released as its layers consume it (or at once if unused)
        e = item.expert
        h, self._right = self.model.blocks_forward(h, self._temb(item.step)[0], self.text.take(item),
                                                   (frames, *self.grid_hw), right=right if item.right else None,
                                                   keep=self._keep(item), expert=e, out_from=self._out_from(item))
        self.text.release(item)
        return h

    def _out_from(self, item: Item) -> int:
        """On the rank with the head: the window's first own token. The head reads only the own frames, so the
        last layer computes the left context as keys and values only (about 1.5 % of a block-step on one GPU)."""
        return self._window(item)[1] * self.hw if self.model.has_head else 0

    def _keep(self, item: Item) -> tuple[int, int] | None:
        """(start, length) token range of the item's window whose K/V the next item reads, or None."""
        _, ctx, _ = self._window(item)
        return (ctx * self.hw, item.keep * self.hw) if item.keep else None

    def _head(self, item: Item, h: torch.Tensor) -> torch.Tensor:
        """Velocity [1, C, own, H, W] float32 of the item's own frames (``h``: their tokens, what the last layer
        leaves, see _out_from), CFG applied."""
        _, _, own = self._window(item)
        e = item.expert
        v = self.model.stages[e].head(h, self._temb(item.step)[1], (own, *self.grid_hw))
        if self.batch[e] == 2:
            v = v[1:2] + self.cfg[e] * (v[0:1] - v[1:2])
        return v

    def _signatures(self, item: Item) -> tuple[tuple, tuple]:
        """What sets the shapes of an item's kernels on this rank: (layers, head)."""
        frames, ctx, own = self._window(item)
        base = (item.expert, self.batch[item.expert], self.grid_hw, frames)
        return ("layers", *base, item.right, self._keep(item), self._out_from(item)), ("head", *base, ctx, own)

    @torch.no_grad()
    def _prewarm(self) -> None:
        """Run this rank's part of every new kernel shape of the job once, locally, before any message is sent.

        Why: loading a kernel's module for its first launch waits until the whole GPU is idle (CUDA lazy loading,
        and torch.compile's Triton kernels on every new shape). In a pipeline that is a deadlock: rank 0 has a
        receive in flight whose kernel spins until the last rank answers, while the last rank waits for hidden
        states that rank 0 cannot send until its own load finishes. The workers also set CUDA_MODULE_LOADING=EAGER
        (torch's own kernels); this covers the kernels compiled or chosen per shape. Each shape is warmed once per
        engine: the first job pays about one block-step of this rank's layers per window shape, later jobs nothing.
        """
        dev, dim, dtype = self.model.device, self.model.config.dim, self.model.dtype
        C, H, W = self.model.config.in_channels, self.job.shape[3], self.job.shape[4]
        ran = False
        for it in self.schedule.items:
            lsig, hsig = self._signatures(it)
            _, e, b, _, frames, right, keep, out_from = lsig
            lsig = (*lsig, self.text.shape(it))  # and the text lengths its cross-attention reads
            if lsig not in self.warmed:
                if self.model.has_embed:
                    h = self.model.stages[e].embed(torch.zeros(1, C, frames, H, W, device=dev))
                    h = h.expand(b, -1, -1).contiguous()
                else:
                    h = torch.zeros(b, frames * self.hw, dim, dtype=dtype, device=dev)
                r = None
                if right:
                    z = torch.zeros(b, right * self.hw, dim, dtype=dtype, device=dev)
                    r = {i: (z, z) for i in self.model.layers}
                self.model.blocks_forward(h, self._temb(it.step)[0], self.text.warm(it), (frames, *self.grid_hw),
                                          right=r, keep=keep, expert=e, out_from=out_from)
                self.warmed.add(lsig)
                ran = True
            if self.model.has_head and hsig not in self.warmed:
                self._head(it, torch.zeros(b, self._window(it)[2] * self.hw, dim, dtype=dtype, device=dev))
                self.warmed.add(hsig)
                ran = True
        if ran and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ profiling (benchmarks only)
    def _cap_memory(self, cap: str) -> dict:
        """This rank's CUDA memory after loading (weights, and what lives outside the allocator: context, NCCL)
        and, given ``cap`` in GiB, the allocator capped to it (benchmarks/fit_24gb.py emulates a smaller card)."""
        dev = self.model.device
        if dev.type != "cuda" or not (self.profile or cap):
            return {}
        weights = torch.cuda.memory_allocated(dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        out = {"weights_gib": weights / 2**30, "device_name": torch.cuda.get_device_name(dev),
               "outside_gib": (total - free - torch.cuda.memory_reserved(dev)) / 2**30}
        if cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total), dev)
            out["cap_gib"] = float(cap)
        return out

    def _profile_start(self) -> None:
        self.last_profile = {}
        if not self.profile:
            return
        dev = self.model.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        self._marks, self._t0 = [], time.perf_counter()
        self._mark()

    def _mark(self) -> None:
        """Stamp the job's start, and on the last rank the end of every block-step's head (CUDA events: no sync)."""
        if self._marks is None:
            return
        if self.model.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def _profile_end(self) -> None:
        """last_profile["profile"]: ``loop_s`` (this rank's run_job, device synchronised at both ends), ``ticks``
        (last rank: seconds from the job's start to each block-step's head, schedule order; others []),
        ``peak_gib`` / ``reserved_gib`` (CUDA allocator peaks of this job; 0 on CPU), ``block_steps``, and on
        GPUs ``weights_gib``, ``outside_gib``, ``device_name`` (+ ``cap_gib`` when capped)."""
        marks, self._marks = self._marks, None
        if marks is None:
            return
        dev = self.model.device
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(dev)
        loop_s = time.perf_counter() - self._t0
        ticks = [marks[0].elapsed_time(e) / 1e3 for e in marks[1:]] if cuda else [t - marks[0] for t in marks[1:]]
        gib = 2**30
        self.last_profile = {"profile": {
            "loop_s": loop_s, "ticks": ticks, "block_steps": len(self.schedule) * self.job.shape[0],
            "peak_gib": torch.cuda.max_memory_allocated(dev) / gib if cuda else 0.0,
            "reserved_gib": torch.cuda.max_memory_reserved(dev) / gib if cuda else 0.0, **self._memory}}

    # ------------------------------------------------------------------ public entry
    def run_job(self, job: Job, progress: ProgressFn | None = None,
                cancelled: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """Run a job on this rank. Rank 0 returns the latents [B, C, T, H, W] (float32, CPU); others None.

        Raises JobCancelled on every rank when rank 0 saw ``cancelled()`` turn true (checked every block-step).
        With profiling on, ``last_profile`` describes the job afterwards.
        """
        self._profile_start()
        job.validate(self.model.config)
        self._prepare(job)
        self.jobs_run += 1
        if self.pipe is not None:  # every step's modulation now: its host-to-GPU copy waits for the GPU to drain
            for step in range(len(self.sc.sigmas) - 1):
                self._temb(step)
        if self.prewarm:
            self._prewarm()
        try:
            if self.rank != 0:
                for _ in range(job.shape[0]):
                    self._serve_video()
                out = None
            else:
                out = self._lead(job, progress, cancelled or (lambda: False))
        finally:
            self._right = None
            self.text = self.image = None
            if self.pipe is not None:
                self.pipe.flush()
        self._profile_end()
        return out

    # ------------------------------------------------------------------ rank 0
    def _lead(self, job: Job, progress: ProgressFn | None, cancelled: Callable[[], bool]) -> torch.Tensor:
        B = job.shape[0]
        sc = self.sc
        sigma0 = float(sc.sigmas[0])
        noise = job.noise if job.noise is not None else initial_noise(job.shape, self.layout, sc.seed,
                                                                      sc.noise_mode)
        latent = job.latent if job.latent is not None else torch.zeros(job.shape)
        out = torch.empty(job.shape, dtype=torch.float32)
        total = job.num_block_steps
        done = 0
        for b in range(B):
            x0 = latent[b:b + 1].float()
            x = sigma0 * noise[b:b + 1].float() + (1.0 - sigma0) * x0 if sc.add_noise else x0.clone()
            x = x.to(self.model.device)
            self.image.select(b, x.device)
            for info in self._sample_video(x, cancelled):
                done += 1
                if progress is not None:
                    progress(done, total, info)
            out[b:b + 1] = x.cpu()
        return out

    def _sample_video(self, x: torch.Tensor, cancelled: Callable[[], bool]):
        """Denoise one video in place; yields after every block-step (the x0 of that block when previews are on)."""
        sched, sc, layout = self.schedule, self.sc, self.layout
        # float32 sigma tables, as ComfyUI's KSampler hands them to its samplers
        samplers = [make_sampler(sc.sampler, torch.tensor(sc.sigmas, dtype=torch.float32))
                    for _ in range(layout.num_blocks)]
        for j, (s, e) in enumerate(layout.blocks):
            x[:, :, s:e] = samplers[j].start(x[:, :, s:e])
        items = sched.items
        finished = [False] * len(items)
        pending: deque[tuple[int, object]] = deque()
        nxt = 0
        for _ in range(len(items)):
            while (nxt < len(items) and len(pending) < self.max_in_flight
                   and all(finished[d] for d in sched.deps(items[nxt]))):
                pending.append((nxt, self._issue(items[nxt], x)))
                nxt += 1
            idx, handle = pending.popleft()
            item = items[idx]
            v = self._collect(handle)
            own_s, own_e = layout.blocks[item.block]
            xo = x[:, :, own_s:own_e]
            sigma = float(sc.sigmas[item.step])
            denoised = xo - sigma * v
            smp = samplers[item.block]
            x[:, :, own_s:own_e] = smp.step(xo, denoised)
            if smp.done:  # final latents (what the right neighbour's last steps read as left context)
                x[:, :, own_s:own_e] = smp.finish(x[:, :, own_s:own_e])
            finished[idx] = True
            yield denoised.cpu() if self.job.preview else None
            # after a video's last block-step there is nothing to stop: the next video (if any) checks again, and
            # a stop header now would wait forever for ranks that have already finished
            if finished[-1]:
                continue
            if cancelled():
                while pending:
                    self._collect(pending.popleft()[1])
                if self.pipe is not None and self.world > 1:
                    self.pipe.send_next(HEADER_STOP)
                raise JobCancelled("cancelled")

    def _issue(self, item: Item, x: torch.Tensor):
        s0, e0 = self.layout.input_span(item.block)
        e = item.expert
        h = self.model.stages[e].embed(self.image.window(x, s0, e0))
        if self.batch[e] == 2:
            h = h.expand(2, -1, -1).contiguous()
        if self.world == 1:
            v = self._head(item, self._layers(item, h))
            self._mark()
            return v
        _, _, own = self._window(item)
        handle = self.pipe.irecv_last((1, x.shape[1], own, x.shape[3], x.shape[4]))
        self.pipe.send_next(item.index, self._layers(item, h))
        return handle

    def _collect(self, handle) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        work, buf = handle
        work.wait()
        return buf

    # ------------------------------------------------------------------ ranks 1..N-1
    def _serve_video(self) -> None:
        c = self.model.config
        for item in self.schedule.items:
            idx = self.pipe.recv_header()
            if idx == HEADER_STOP:
                if not self.pipe.is_last:
                    self.pipe.send_next(HEADER_STOP)
                raise JobCancelled("cancelled")
            if idx != item.index:
                raise RuntimeError(f"rank {self.rank} expected block-step {item.index}, got {idx}: "
                                   f"the ranks disagree on the schedule.")
            frames, _, _ = self._window(item)
            h = self.pipe.recv_prev((self.batch[item.expert], frames * self.hw, c.dim), self.model.dtype)
            h = self._layers(item, h)
            if self.pipe.is_last:
                v = self._head(item, h).contiguous()
                self._mark()
                self.pipe.send_first(v)
            else:
                self.pipe.send_next(item.index, h)


def run_single_process(stage: WanStage | Experts, job: Job, progress: ProgressFn | None = None,
                       cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
    """The reference: the whole block schedule in one process on a stage (or expert pair) owning every layer."""
    kvcache.check_job(stage, job, 1)  # an offloaded cache must fit the host (a pool checks on rank 0, recoverably)
    return RankEngine(stage).run_job(job, progress, cancelled)
