"""The bench's rows: FLOPs filled in from the row's own schedule, one printed table, ratios to each peer."""

from __future__ import annotations

COLUMNS = ("setting", "GPUs", "latent frames", "time after warm-up (s)", "block-steps", "ms per block-step",
           "GFLOP per block-step", "TFLOP/s per GPU", "peak GiB per GPU", "time / ours")


def finish(row: dict, flops: list[float]) -> dict:
    """Add block-steps, FLOPs and the rate to a measured (or failed) row."""
    row.update(block_steps=len(flops), flops=sum(flops), flops_per_block_step=sum(flops) / max(len(flops), 1),
               video_frames=(row["frames"] - 1) * 4 + 1)
    s = row.get("seconds")
    row["tflops_per_gpu"] = row["flops"] / s / row["gpus"] / 1e12 if s else None
    row["ms_per_block_step"] = 1e3 * s / len(flops) if s and flops else None
    return row


def _ours(rows: list[dict], frames: int) -> dict | None:
    return next((r for r in rows if r["kind"] == "ours" and r["frames"] == frames and r.get("seconds")), None)


def add_ratios(rows: list[dict]) -> None:
    """``time_vs_ours`` / ``peak_vs_ours``: each measured row against ours at the same length."""
    for r in rows:
        ours = _ours(rows, r["frames"])
        ok = ours is not None and r.get("seconds")
        r["time_vs_ours"] = r["seconds"] / ours["seconds"] if ok else None
        r["peak_vs_ours"] = r["peak_gib"] / ours["peak_gib"] if ok and ours.get("peak_gib") else None


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def line(r: dict) -> str:
    """One row of the table (a failed or skipped row says why in its time column)."""
    if r.get("seconds") is None:
        time = r.get("error") or r.get("note") or "-"
    else:
        time = f"{r['seconds']:.2f}" + (f" ({r['note']})" if r.get("note") else "")
    peak = _num(r.get("peak_gib") or None, ".2f")
    cells = (r["name"], str(r["gpus"]), str(r["frames"]), time, str(r["block_steps"]),
             _num(r.get("ms_per_block_step"), ".4g"), f"{r['flops_per_block_step'] / 1e9:.4g}", _num(r.get("tflops_per_gpu"), ".4g"), peak,
             _num(r.get("time_vs_ours"), ".2f"))
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head, *(line(r) for r in rows)])


def ratio_lines(rows: list[dict]) -> list[str]:
    """For each of our measured rows: its speed-up over each measured peer of the same length, and memory."""
    out = []
    for ours in (r for r in rows if r["kind"] == "ours" and r.get("seconds")):
        peers = [r for r in rows if r["kind"] != "ours" and r["frames"] == ours["frames"] and r.get("seconds")]
        parts = []
        for p in peers:
            mem = f", peak {p['peak_gib'] / ours['peak_gib']:.2f}x" if p.get("peak_gib") and ours.get("peak_gib") \
                else ""
            err = f", final latents' relative error against ours {p['latent_rel_err']:.3g}" \
                if p.get("latent_rel_err") is not None else ""
            parts.append(f"{p['name']} {p['seconds'] / ours['seconds']:.2f}x{mem}{err}")
        if parts:
            out.append(f"{ours['name']} T={ours['frames']}, each peer's time (and peak) over ours: " + "; ".join(parts))
    return out
