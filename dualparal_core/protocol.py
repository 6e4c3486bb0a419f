"""What crosses the process boundary: every op, every message shape, every error type, and the sampling job.

Three channels exist (docs/ARCHITECTURE.md draws them):

* **parent <-> rank 0**, authenticated (:mod:`dualparal_core.channel`), pickles of dicts ``{"op": str, ...}``
  whose values are numbers, strings, lists, tensors or the frozen dataclasses of :mod:`dualparal_core.config` /
  this module (both sides import ``dualparal_core`` as a top-level package, so they unpickle under the same name);
* **rank 0 -> the other ranks**, the gloo control group (``broadcast_object_list``): the parent's ops relayed;
* **rank r -> parent, bulk**: Block Decode's frames, each rank on its own authenticated connection to the address
  the parent put in ``OP_DECODE`` (so a decode's frames do not queue behind rank 0);
* **the rendezvous store** (TCPStore, unauthenticated): only plain JSON that :func:`read_store` validates (error
  reports, heartbeats, rank 0's listening port), never pickles: anyone who reaches the store may write to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .conditioning import ImageConditioning
from .config import MAX_CONTEXT_TOKENS, SamplingConfig, WanConfig

if TYPE_CHECKING:
    from .timeline import Timeline

# parent -> rank 0
OP_SPEC = "spec"  # the attach hello: {"model": PoolSpec | None, "version", "client"}; answered by READY or ERROR
OP_JOB = "job"  # {"job": id, "payload": Job}
OP_DECODE = "decode"  # Block Decode, one span per rank (dualparal_core/client/decode.py documents the fields)
OP_CANCEL = "cancel"  # {"job": id}; also sent on a rank's decode connection
OP_CLOSE = "close"  # detach (a --exit-on-detach group, i.e. a local pool, then exits)
OP_PING = "ping"
OP_IDLE = "idle"  # the op is over (Block Decode: every rank's span too): rank 0 stops beating
# rank 0 -> the other ranks (control group)
OP_LOAD = "load"  # {"model": PoolSpec | None}
OP_NOOP = "noop"  # keeps the control group's collectives inside their timeout while idle
OP_EXIT = "exit"  # the group ends (a local pool's parent detached)
# rank 0 (rank r on a decode connection) -> parent
OP_READY = "ready"  # {"info": [one dict per rank]}
OP_STATUS = "status"  # heartbeat / phase text: {"phase", "step", "computing_for", "peers", "heartbeat", "text"}
OP_PROGRESS = "progress"  # {"job", "done", "total", "preview"}
OP_FRAMES = "frames"  # one decoded block: {"job", "video", "frame", "frames": [n, H, W, 3]}
OP_RESULT = "result"  # {"job", "latents", "info"} (sampling) or a rank's decode counters
OP_CANCELLED = "cancelled"
OP_ERROR = "error"  # a failure report: {"rank", "device", "host", "phase", "type", "message", "traceback"}
OP_PONG = "pong"


# ---------------------------------------------------------------------------------------------- error types
class WorkerError(RuntimeError):
    """A rank failed: ``rank`` (None: the group as a whole), ``device``, ``phase`` and ``cause`` (with the rank's
    traceback when it sent one); ``exc_type`` is the rank's exception type name, when there was one."""

    def __init__(self, rank: int | None, device: str | None, phase: str, cause: str, exc_type: str | None = None):
        self.rank, self.device, self.phase, self.cause, self.exc_type = rank, device, phase, cause, exc_type
        who = f"rank {rank} ({device})" if rank is not None else "worker group"
        when = "while idle" if phase == "idle" else f"during {phase}"
        super().__init__(f"DualParal {who} failed {when}: {cause}")


class PoolCancelled(Exception):
    """The caller cancelled: a job (the pool stays usable) or a start (nothing is left running)."""


class AttachError(ConnectionError):
    """Attaching failed before any work: nothing listens, wrong key, the group is in use, versions differ."""


class DecodeError(RuntimeError):
    """A rank's decode raised (bad weights, a latent that does not fit); the pool stays usable."""

    def __init__(self, rank: int, device: str, exc_type: str, message: str):
        self.rank, self.device, self.exc_type = rank, device, exc_type
        super().__init__(f"Block Decode failed on rank {rank} ({device}): {exc_type}: {message}")


def error_from_report(msg: dict, default_phase: str = "sample") -> WorkerError:
    """A rank's ``OP_ERROR`` report -> WorkerError (the rank, its device and host, phase, traceback)."""
    where = f"{msg.get('device', '?')} on {msg['host']}" if msg.get("host") else msg.get("device")
    cause = f"{msg['type']}: {msg.get('message', '')}" if msg.get("type") else msg.get("message", "")
    if msg.get("traceback"):
        cause += f"\n{msg['traceback']}"
    return WorkerError(msg.get("rank"), where, msg.get("phase") or default_phase, cause, msg.get("type"))


# ---------------------------------------------------------------------------------------------- the store
_STORE_SCHEMA: dict[str, dict[str, tuple]] = {
    "report": {"rank": (int,), "device": (str, type(None)), "host": (str, type(None)), "phase": (str, type(None)),
               "type": (str, type(None)), "message": (str,), "traceback": (str,), "time": (int, float)},
    "beat": {"n": (int,), "phase": (str,), "step": (int,), "computing_for": (int, float, type(None))},
    "port": {"port": (int,)},
}


def write_store(kind: str, value: dict) -> bytes:
    """A store value of ``kind`` as JSON bytes (checked against the schema first: we write only what we read)."""
    data = json.dumps({"kind": kind, **value}).encode()
    if read_store(kind, data) is None:
        raise ValueError(f"not a valid {kind} for the rendezvous store: {value!r}")
    return data


def read_store(kind: str, raw: bytes) -> dict | None:
    """Parse a store value written by :func:`write_store`; None for anything else (the store is unauthenticated:
    a value that is not exactly our schema is ignored, and never evaluated or unpickled)."""
    try:
        value = json.loads(bytes(raw)[:65536].decode())
    except (ValueError, UnicodeDecodeError, TypeError):
        return None
    schema = _STORE_SCHEMA[kind]
    if not isinstance(value, dict) or value.get("kind") != kind or set(value) != {"kind", *schema}:
        return None
    for key, types in schema.items():
        v = value[key]
        if not isinstance(v, types) or isinstance(v, bool) or (isinstance(v, str) and len(v) > 20000):
            return None
    value.pop("kind")
    return value


RANK0_LATENT_COPIES = 4
"""How many float32 copies of the whole latent video rank 0's host holds while sampling (a bound, for the check)."""


@dataclass
class Job:
    """One sampling request: B videos of shape ``shape`` (latent frames T), in the model's normalised space."""

    sampling: SamplingConfig
    shape: tuple[int, int, int, int, int]
    """(B, C, T, H, W) of the latent."""
    cond: torch.Tensor
    """Positive text conditioning [1, L, text_dim] (float32, CPU)."""
    uncond: torch.Tensor | None = None
    """Negative text conditioning [1, L', text_dim], required when cfg != 1."""
    latent: torch.Tensor | None = None
    """Initial latent [B, C, T, H, W] in normalised space (None: zeros, i.e. pure noise)."""
    noise: torch.Tensor | None = None
    """Explicit initial noise [B, C, T, H, W] (tests); None: drawn from sampling.seed / noise_mode."""
    preview: bool = False
    """Whether progress events carry the x0 of the block just stepped (for ComfyUI's latent previews)."""
    timeline: Timeline | None = None
    """A prompt per stretch of the video (:mod:`~dualparal_core.timeline`); None: ``cond`` (and ``uncond``) for
    every block. With a timeline, ``cond``/``uncond`` are its first prompts."""
    image: ImageConditioning | None = None
    """Image-to-video conditioning (concat latent, CLIP-vision tokens), shared by cond and uncond; None: none."""

    def validate(self, config: WanConfig) -> None:
        """Raise ValueError naming the input, the value and what would work, before any GPU work."""
        if len(self.shape) != 5:
            raise ValueError(f"latent_image has shape {tuple(self.shape)}; a Wan video latent is 5-D "
                             f"[batch, {config.out_channels}, frames, height/8, width/8].")
        b, c, t, h, w = self.shape
        if c != config.out_channels:
            raise ValueError(f"latent_image has {c} channels but the model takes {config.out_channels} "
                             f"(Wan2.1 VAE latents have 16; TI2V-5B's 48-channel latents are not supported).")
        pt, ph, pw = config.patch_size
        if h % ph or w % pw or t % pt:
            raise ValueError(f"latent_image is {h}x{w} (latent pixels); both must be divisible by the patch size "
                             f"{ph}x{pw}: use a pixel width/height divisible by {8 * ph} (e.g. 832x480).")
        if b < 1 or t < 1:
            raise ValueError(f"latent_image shape {tuple(self.shape)} is empty.")
        for name, ctx in (("positive", self.cond), ("negative", self.uncond)):
            if ctx is None:
                if name == "negative" and self.sampling.use_cfg:
                    sc = self.sampling
                    which = f"cfg={sc.cfg}" if sc.cfg != 1.0 else f"cfg_low={sc.cfg_low}"
                    raise ValueError(f"{which} needs a negative conditioning; connect one or set it to 1.0.")
                continue
            if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[-1] != config.text_dim:
                raise ValueError(f"{name} conditioning has shape {tuple(ctx.shape)}; this model expects "
                                 f"[1, tokens, {config.text_dim}] (umt5-xxl text embeddings for Wan).")
            if not torch.isfinite(ctx).all():
                raise ValueError(f"{name} conditioning contains NaN or infinite values.")
        self._check_tokens()
        if self.timeline is not None:
            self.timeline.validate(config, self.sampling.layout(t))
        self._check_memory()
        if self.image is not None:
            self.image.validate(config, self.shape)
        for name, tens in (("latent_image", self.latent), ("noise", self.noise)):
            if tens is None:
                continue
            if tuple(tens.shape) != tuple(self.shape):
                raise ValueError(f"{name} has shape {tuple(tens.shape)}, expected {tuple(self.shape)}.")
            if not torch.isfinite(tens).all():
                raise ValueError(f"{name} contains NaN or infinite values; it cannot be sampled from.")

    def _check_tokens(self) -> None:
        """Each prompt within MAX_CONTEXT_TOKENS (cond and uncond keep their own lengths)."""
        for name, ctx in (("positive", self.cond), ("negative", self.uncond)):
            if ctx is not None and ctx.shape[1] > MAX_CONTEXT_TOKENS:
                raise ValueError(f"{name} has {ctx.shape[1]} tokens, more than the {MAX_CONTEXT_TOKENS} (8 x 512) "
                                 f"the sampler accepts. Keep each prompt within 512 tokens (CLIP Text Encode pads "
                                 f"a shorter Wan prompt to 512).")

    def _check_memory(self) -> None:
        """Rank 0 holds the whole video in float32 a few times (latents, noise, result, transfer): refuse what this
        host's free RAM cannot hold before anything allocates it (a clear sentence, not an allocator error)."""
        latent = math.prod(self.shape) * 4
        concat = self.image.concat.numel() * 4 if self.image is not None and self.image.concat is not None else 0
        need = RANK0_LATENT_COPIES * latent + concat  # + the I2V concat latent (20 channels), held once
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except Exception:  # noqa: BLE001 - no psutil (or no /proc): the allocator will say it
            return
        if need > avail:
            gib = 1024**3
            raise ValueError(f"latent_image {list(self.shape)} is {latent / gib:.1f} GiB in float32; sampling "
                             f"holds about {RANK0_LATENT_COPIES} copies of it ({need / gib:.1f} GiB) on rank 0's "
                             f"host, which has {avail / gib:.1f} GiB of RAM available. Use fewer frames (length), "
                             f"a smaller width/height or a smaller batch.")

    @property
    def num_block_steps(self) -> int:
        layout = self.sampling.layout(self.shape[2])
        return self.shape[0] * layout.num_blocks * self.sampling.steps
