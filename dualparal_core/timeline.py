"""A prompt timeline: a different prompt for each stretch of one continuous video (issue 18).

Every DualParal block is its own block-step with its own text cross-attention, so one denoise can change prompts
along the video: block j takes the prompt whose stretch holds its first own frame, and the K context frames on both
sides carry motion and colour across the hand-over. Starts are in *video* frames (what users count); latent frame t
holds video frames 4t-3..4t (frame 0 alone for t = 0), Wan's VAE stride.

With ``transition`` = T > 0 video frames, the prompts' text embeddings blend linearly over T frames centred on each
boundary: the weight of stretch i at a block starting at video frame f is ``ramp(f, s_i) - ramp(f, s_{i+1})`` with
``ramp(f, s) = clamp((f - s) / T + 1/2, 0, 1)`` (a step at s when T = 0), so the weights are >= 0 and sum to 1 even
when transitions overlap. Blending needs the prompts of a blend to have one token count (CLIP Text Encode pads every
Wan prompt to 512).

Text K/V (:class:`TextBank`) are built once per distinct prompt or blend and video, when the first block-step that
needs them runs on this rank, and freed after the last one: memory holds the K/V of the prompts in flight only. Every
rank derives the same plan from the job (pure integer and float arithmetic on the same values), so no rank needs to
be told which K/V a block-step uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .conditioning import image_kv
from .config import MAX_CONTEXT_TOKENS, BlockLayout, WanConfig

VAE_STRIDE = 4
"""Video frames per latent frame after the first (Wan2.1/2.2 VAE)."""

Mix = tuple[tuple[int, float], ...]
"""A blend of a track's prompts: (prompt index, weight) pairs, weights > 0 summing to 1."""


def video_frames(latent_frames: int) -> int:
    """Video frames of a latent of ``latent_frames`` frames (81 for 21)."""
    return VAE_STRIDE * (latent_frames - 1) + 1


def first_video_frame(latent_frame: int) -> int:
    """The first video frame that latent frame ``latent_frame`` decodes to."""
    return 0 if latent_frame == 0 else VAE_STRIDE * latent_frame - (VAE_STRIDE - 1)


@dataclass(frozen=True)
class Track:
    """The prompts of one side (positive or negative), in order of their starts."""

    texts: tuple[torch.Tensor, ...]
    """Text embeddings [1, L_i, text_dim] float32 CPU, one per stretch."""
    starts: tuple[int, ...]
    """Video frame where each stretch starts; strictly increasing, the first 0."""
    labels: tuple[str, ...] = ()
    """How messages name each stretch (default: 'prompt i')."""

    @staticmethod
    def single(text: torch.Tensor) -> Track:
        return Track((text,), (0,))

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) and self.labels[i] else f"prompt {i + 1}"

    def weights(self, frame: int, transition: int) -> Mix:
        """The blend of this track at a block whose first own frame is video frame ``frame``."""
        def ramp(i: int) -> float:
            if i == 0:
                return 1.0
            if i >= len(self.starts):
                return 0.0
            if transition <= 0:
                return 1.0 if frame >= self.starts[i] else 0.0
            return min(1.0, max(0.0, (frame - self.starts[i]) / transition + 0.5))

        return tuple((i, w) for i in range(len(self.starts)) if (w := ramp(i) - ramp(i + 1)) > 0.0)

    def mix(self, m: Mix) -> torch.Tensor:
        """The text embedding of a blend (the prompt itself, untouched, for a single one)."""
        if len(m) == 1:
            return self.texts[m[0][0]]
        out = self.texts[m[0][0]] * m[0][1]
        for i, w in m[1:]:
            out = out + self.texts[i] * w
        return out

    def check(self, name: str, config: WanConfig, video_len: int) -> None:
        """Shapes, values, starts; raises ValueError naming the stretch."""
        if not self.texts or len(self.texts) != len(self.starts):
            raise ValueError(f"{name} timeline has {len(self.texts)} prompts for {len(self.starts)} starts.")
        for i, (t, s) in enumerate(zip(self.texts, self.starts)):
            what = f"{name} {self.label(i)} (starting at video frame {s})" if len(self.texts) > 1 else name
            if t.ndim != 3 or t.shape[0] != 1 or t.shape[-1] != config.text_dim:
                raise ValueError(f"{what} conditioning has shape {tuple(t.shape)}; this model expects "
                                 f"[1, tokens, {config.text_dim}] (umt5-xxl text embeddings for Wan).")
            if not torch.isfinite(t).all():
                raise ValueError(f"{what} conditioning contains NaN or infinite values.")
            if t.shape[1] > MAX_CONTEXT_TOKENS:
                raise ValueError(f"{what} has {t.shape[1]} tokens, more than the {MAX_CONTEXT_TOKENS} (8 x 512) "
                                 f"the sampler accepts. Keep each prompt within 512 tokens (CLIP Text Encode pads "
                                 f"a shorter Wan prompt to 512).")
        if self.starts[0] != 0:
            raise ValueError(f"{name} timeline's first stretch ({self.label(0)}) starts at video frame "
                             f"{self.starts[0]}; the first must start at 0 so that every frame has a prompt. Set "
                             f"its start to 0.")
        for i in range(1, len(self.starts)):
            if self.starts[i] == self.starts[i - 1]:
                raise ValueError(f"{name} {self.label(i - 1)} and {self.label(i)} both start at video frame "
                                 f"{self.starts[i]}; give each stretch its own start (combine the two prompts "
                                 f"with Conditioning Concat if both are meant for the same frames).")
            if self.starts[i] < self.starts[i - 1]:
                raise ValueError(f"{name} timeline starts {list(self.starts)} are not in order.")
        if self.starts[-1] >= video_len:
            raise ValueError(f"{name} {self.label(len(self.starts) - 1)} starts at video frame {self.starts[-1]} "
                             f"but the video has {video_len} frames (0-{video_len - 1}); use a start below "
                             f"{video_len} or a longer latent.")


@dataclass(frozen=True)
class Timeline:
    """The job's prompts along the video; the negative track None means the job's one ``uncond``."""

    positive: Track
    negative: Track | None = None
    transition: int = 0
    """Video frames over which neighbouring prompts blend (0: a hard switch at each start)."""

    def block_frames(self, layout: BlockLayout) -> list[int]:
        return [first_video_frame(s) for s, _ in layout.blocks]

    def plan(self, layout: BlockLayout) -> list[tuple[Mix, Mix | None]]:
        """Per block: (positive blend, negative blend or None)."""
        out = []
        for f in self.block_frames(layout):
            neg = self.negative.weights(f, self.transition) if self.negative is not None else None
            out.append((self.positive.weights(f, self.transition), neg))
        return out

    def validate(self, config: WanConfig, layout: BlockLayout) -> None:
        """Raise ValueError naming the stretch, the value and the fix, before any work."""
        if not isinstance(self.transition, int) or self.transition < 0:
            raise ValueError(f"transition={self.transition!r} must be a whole number of video frames >= 0.")
        n = video_frames(layout.num_frames)
        tracks = [("positive", self.positive)] + ([("negative", self.negative)] if self.negative else [])
        for name, track in tracks:
            track.check(name, config, n)
        for j, keys in enumerate(self.plan(layout)):
            for (name, track), m in zip(tracks, keys):
                lens = {track.texts[i].shape[1] for i, _ in m}
                if len(lens) > 1:
                    names = ", ".join(f"{track.label(i)} ({track.texts[i].shape[1]} tokens)" for i, _ in m)
                    raise ValueError(f"transition={self.transition} blends {name} {names} at block {j}, but only "
                                     f"prompts of one token count can blend. Encode them with the same text "
                                     f"encoder (CLIP Text Encode pads to 512), or set transition to 0.")

    def unused(self, layout: BlockLayout) -> list[str]:
        """A sentence for every stretch that no block uses (shorter than a block): never a silent drop."""
        frames = self.block_frames(layout)
        plan = self.plan(layout)
        out = []
        for side, (name, track) in enumerate((("positive", self.positive), ("negative", self.negative))):
            if track is None:
                continue
            used = {i for keys in plan for i, _ in keys[side]}
            for i, s in enumerate(track.starts):
                if i not in used:
                    end = track.starts[i + 1] if i + 1 < len(track.starts) else video_frames(layout.num_frames)
                    out.append(f"{name} {track.label(i)} (video frames {s}-{end - 1}) is shorter than a block: "
                               f"no block starts in it, so no block uses it. Blocks start at video frames "
                               f"{frames}; lengthen the stretch, lower num_per_block or add a transition.")
        return out

    def block_labels(self, layout: BlockLayout) -> list[str]:
        """Which positive prompt (or blend) each block uses, for the status line."""
        return [describe(self.positive, pos) for pos, _ in self.plan(layout)]


class TextBank:
    """The text K/V of a job on one rank, per (expert, blend): built lazily, counted by block-steps, freed after
    the last block-step of a video that reads them (the next video builds them again)."""

    def __init__(self, model, job, schedule, batch: list[int]):
        self.model, self.batch = model, batch
        tl = job.timeline if job.timeline is not None else Timeline(Track.single(job.cond))
        self.positive = tl.positive
        self.negative = tl.negative if tl.negative is not None else (
            Track.single(job.uncond) if job.uncond is not None else None)
        plan = tl.plan(schedule.layout)
        if tl.negative is None and self.negative is not None:
            plan = [(p, ((0, 1.0),)) for p, _ in plan]
        self.plan = plan
        self.clip = None if job.image is None else job.image.clip  # I2V: CLIP-vision tokens for the image K/V
        self.counts = Counter(self.key(it) for it in schedule.items)
        self.left = dict(self.counts)
        self.live: dict[tuple, object] = {}
        self.image: dict[tuple[int, int], dict | None] = {}  # (expert, batch) -> image K/V, once per job
        self.builds = 0

    def key(self, item) -> tuple:
        """(expert, positive blend, negative blend or None when the expert runs without CFG)."""
        e = item.expert
        pos, neg = self.plan[item.block]
        return e, pos, neg if self.batch[e] == 2 else None

    def _build(self, key: tuple):
        e, pos, neg = key
        stage = self.model.stages[e]
        c = self.positive.mix(pos)

        def text(ctx):  # I2V: the CLIP-vision tokens go with every prompt (image K/V, conditioning.image_kv)
            if self.clip is None:  # (without them, a Wan2.1 I2V model reads the prompt's own tokens as the image)
                return stage.prepare_text(ctx)
            t = stage.prepare_text(ctx, image=False)
            return type(t)(t.kv, self._image_kv(e, ctx.shape[0]))

        if neg is None:
            return text(c)
        u = self.negative.mix(neg)
        if c.shape[1] == u.shape[1]:
            return text(torch.cat([c, u], dim=0))
        # each half keeps its own length: the layer runs cross-attention per batch half (model.WanStage._layer)
        a, b = text(c), text(u)
        return type(a)({i: (a.kv[i], b.kv[i]) for i in a.kv},
                       None if a.img is None else {i: (a.img[i], b.img[i]) for i in a.img})

    def _image_kv(self, e: int, batch: int):
        """The image K/V of the CLIP-vision tokens for expert ``e`` at ``batch``: the same for every prompt, so
        computed once per job and shared by every prompt's K/V (None for a model without the image
        cross-attention)."""
        k = (e, batch)
        if k not in self.image:
            self.image[k] = image_kv(self.model.stages[e], None, self.clip.expand(batch, -1, -1))
        return self.image[k]

    def take(self, item):
        """The K/V the item's layers read (built if this is the first item of the video needing them)."""
        k = self.key(item)
        if k not in self.live:
            self.live[k] = self._build(k)
            self.builds += 1
        return self.live[k]

    def release(self, item) -> None:
        """The item's layers are done with its K/V: free them after the video's last reader."""
        k = self.key(item)
        self.left[k] -= 1
        if self.left[k] == 0:
            del self.live[k]
            self.left[k] = self.counts[k]

    def shape(self, item) -> tuple:
        """What the item's K/V shapes depend on (pre-warm): its expert and token count(s)."""
        e, pos, neg = self.key(item)
        n = self.positive.texts[pos[0][0]].shape[1]
        return e, n, None if neg is None else self.negative.texts[neg[0][0]].shape[1]

    def warm(self, item):
        """K/V of the item's shape, not counted (pre-warm: the kernels of the job's text lengths)."""
        return self._build(self.key(item))


def describe(track: Track, m: Mix) -> str:
    if len(m) == 1:
        return track.label(m[0][0])
    return " + ".join(f"{track.label(i)} {w:.0%}" for i, w in m)
