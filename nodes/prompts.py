"""Prompt timeline tags on plain CONDITIONING entries <-> the engine's :class:`~dualparal_core.timeline.Timeline`.

A tag is two keys in an entry's dict (``[tensor, {...}]``): the stretch's first video frame and a label. ComfyUI's
Conditioning Combine concatenates entry lists and WanImageToVideo / ConditioningSetTimestepRange copy each entry's
dict before adding their keys (node_helpers.conditioning_set_values), so tags survive them and the Sampler's
``positive`` stays a plain CONDITIONING. Pure: imports the engine's data classes, never ComfyUI.
"""

from __future__ import annotations

from dualparal_core.schedule import Schedule
from dualparal_core.timeline import Timeline, Track

from .types import extract_conditioning

TAG_START = "dualparal_start"
"""Video frame where the entry's stretch starts (an int)."""
TAG_LABEL = "dualparal_label"
"""How messages and the status line name the stretch."""
FPS_DEFAULT = 16.0
"""Wan2.1 and Wan2.2 A14B generate 16 frames per second."""


def start_frame(start: float, unit: str, fps: float) -> int:
    """The tagging node's start -> a video frame; ValueError naming the input."""
    if unit == "seconds":
        if not fps > 0:
            raise ValueError(f"fps={fps} must be above 0 (Wan2.1/2.2 A14B: 16).")
        return int(round(float(start) * float(fps)))
    if unit != "frames":
        raise ValueError(f"unit={unit!r} must be 'seconds' or 'frames'.")
    if float(start) != int(start):
        raise ValueError(f"start={start} frames is not a whole frame; use a whole number or unit 'seconds'.")
    return int(start)


def tag(conditioning, frame: int, label: str, previous=None) -> list:
    """``previous`` (if any) followed by ``conditioning``'s entries, each copied with the tag set."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("conditioning is not a CONDITIONING; connect a CLIP Text Encode.")
    if frame < 0:
        raise ValueError(f"start is {frame} video frames; a stretch starts at frame 0 or later.")
    out = [[e[0], {**(e[1] or {}), TAG_START: int(frame), TAG_LABEL: str(label)}] for e in conditioning]
    return list(previous or []) + out


def read_track(cond, name: str, text_dim: int) -> Track | None:
    """A tagged CONDITIONING -> its Track (entries sorted by start); None when no entry is tagged.

    Rule: either every entry is tagged or none is; an untagged entry among tagged ones is refused, naming it.
    """
    if not isinstance(cond, (list, tuple)) or not cond:
        return None
    tagged = [isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[1], dict) and TAG_START in e[1]
              for e in cond]
    if not any(tagged):
        return None
    if not all(tagged):
        i = tagged.index(False)
        raise ValueError(f"{name} holds {len(cond)} conditionings and entry {i + 1} has no DualParal Prompt At tag "
                         f"while the others have one: in a prompt timeline every prompt needs a start. Put a "
                         f"DualParal Prompt At after that CLIP Text Encode (start 0 for the opening stretch).")
    rows = []
    for i, (tensor, extras) in enumerate(cond):
        start, label = extras[TAG_START], str(extras.get(TAG_LABEL) or "")
        if not isinstance(start, int) or isinstance(start, bool):
            raise ValueError(f"{name} entry {i + 1} has a start of {start!r}; it must be a video frame number.")
        rest = {k: v for k, v in extras.items() if k not in (TAG_START, TAG_LABEL)}
        shown = f"{name} ({label or f'prompt at frame {start}'})"
        rows.append((start, i, label or f"prompt at frame {start}",
                     extract_conditioning([[tensor, rest]], shown, text_dim)))
    rows.sort(key=lambda r: (r[0], r[1]))
    return Track(tuple(r[3] for r in rows), tuple(r[0] for r in rows), tuple(r[2] for r in rows))


def conditionings(positive, negative, guided: bool, text_dim: int, transition: int):
    """(cond, uncond or None, Timeline or None) of the Sampler's inputs; no tag anywhere: exactly as before."""
    pos = read_track(positive, "positive", text_dim)
    neg = read_track(negative, "negative", text_dim) if guided else None
    cond = pos.texts[0] if pos is not None else extract_conditioning(positive, "positive", text_dim)
    uncond = None
    if guided:
        uncond = neg.texts[0] if neg is not None else extract_conditioning(negative, "negative", text_dim)
    if pos is None and neg is None:
        return cond, uncond, None
    return cond, uncond, Timeline(pos if pos is not None else Track.single(cond), neg, int(transition))


def status_lines(timeline: Timeline, schedule: Schedule):
    """done block-steps -> the status line (the newest started block and its prompt), or None when unchanged."""
    labels = timeline.block_labels(schedule.layout)
    newest, top = [], -1
    for it in schedule.items:
        top = max(top, it.block)
        newest.append(top)
    n, last = len(schedule.items), [None]

    def line(done: int) -> str | None:
        j = newest[(done - 1) % n]
        text = f"block {j + 1}/{schedule.layout.num_blocks}: {labels[j]}"
        if text == last[0]:
            return None
        last[0] = text
        return text

    return line
