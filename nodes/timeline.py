"""DualParal Prompt At: tags a prompt with where its stretch of the video starts (a prompt timeline, issue 18)."""

from __future__ import annotations

from .bridge import io, logger
from .prompts import FPS_DEFAULT, start_frame, tag

TRANSITION_INPUT = io.Int.Input(
    "transition", default=0, min=0, max=100000, optional=True,
    tooltip="Prompt timeline (DualParal Prompt At): video frames over which neighbouring prompts blend, centred on "
            "each start; 0 switches at the start. Blended prompts need one token count.")
"""The Sampler's optional ``transition`` input (defined here with the rest of the timeline)."""


class DualParalPromptAt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalPromptAt",
            display_name="DualParal Prompt At",
            category="DualParal",
            description="Tags a prompt with where its stretch of the video starts, for a prompt timeline: chain one "
                        "per stretch through 'previous' (or join them with Conditioning Combine) into the DualParal "
                        "Sampler's positive (or negative). Each block takes the prompt whose stretch holds its first "
                        "frame; the Sampler's 'transition' blends neighbouring prompts. Untagged: one prompt.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The stretch's prompt, from CLIP Text Encode."),
                io.Float.Input("start", default=0.0, min=0.0, max=1e6, step=0.25,
                               tooltip="Where the stretch starts (the first stretch starts at 0); it lasts until "
                                       "the next stretch's start."),
                io.Combo.Input("unit", options=["seconds", "frames"], default="seconds",
                               tooltip="start in seconds (times fps) or in video frames."),
                io.Float.Input("fps", default=FPS_DEFAULT, min=0.01, max=240.0, step=1.0,
                               tooltip="Frames per second of the video, for starts in seconds (Wan2.1/2.2: 16)."),
                io.String.Input("label", default="", optional=True,
                                tooltip="A name for the stretch in messages and the Sampler's status line."),
                io.Conditioning.Input("previous", optional=True,
                                      tooltip="The earlier stretches (another DualParal Prompt At)."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING",
                                            tooltip="previous + this prompt, tagged; a plain CONDITIONING.")],
        )

    @classmethod
    def execute(cls, conditioning, start: float, unit: str, fps: float, label: str = "",
                previous=None) -> io.NodeOutput:
        frame = start_frame(start, unit, fps)
        return io.NodeOutput(tag(conditioning, frame, label or "", previous))


def send_status(text: str, node_id: str | None) -> None:
    """The node's status line (PromptServer.send_progress_text, server.py); nothing where it does not exist."""
    try:
        from server import PromptServer

        send = getattr(getattr(PromptServer, "instance", None), "send_progress_text", None)
        if send is not None and node_id is not None:
            send(text, node_id)
    except Exception:  # a status line must never fail the job
        logger.debug("DualParal status line not sent", exc_info=True)


def job_status(job, node_id: str | None):
    """For a job with a timeline: log a warning for every stretch no block uses, and return the callback that
    shows on the node which prompt the newest block uses (with those warnings); None without a timeline."""
    from dualparal_core.schedule import Schedule

    from .prompts import status_lines

    tl = job.timeline
    if tl is None:
        return None
    layout = job.sampling.layout(job.shape[2])
    unused = tl.unused(layout)
    for msg in unused:
        logger.warning("DualParal Sampler: %s", msg)
    suffix = f" | warning: {len(unused)} stretch(es) used by no block (see the log)" if unused else ""
    line = status_lines(tl, Schedule(layout, job.sampling.steps))

    def on_done(done: int) -> None:
        text = line(done)
        if text is not None:
            send_status(text + suffix, node_id)

    return on_done
