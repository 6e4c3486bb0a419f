"""The one ``devices`` grammar (the Loader's input, the CLI's --devices, PoolSpec.devices, check_spec): parsing to
one torch device per rank or an attach address, and the refusal of GPUs a process does not see. Re-exported by
:mod:`dualparal_core.config`, where the callers import it."""

from __future__ import annotations

import re

#: What ``devices="auto"`` means where no GPU is visible: two CPU ranks over gloo, enough to try the pipeline.
AUTO_CPU_RANKS = 2
DEVICE_FORMS = ("use 'auto', GPU indices like '0,1' (or 'cuda:0,cuda:1'), 'cpu:N' (N CPU ranks) or "
                "'tcp://HOST:PORT' (a torchrun-started group)")
_DEVICE_RE = re.compile(r"(?:cuda:)?(\d+)|cpu(?::(\d+))?")


def parse_devices(text: str | tuple[str, ...], gpu_count: int | None = None, *, name: str = "devices",
                  attach: bool = True) -> tuple[str, ...]:
    """The one ``devices`` grammar -> one torch device per rank ("cuda:N" or "cpu"), or ``("tcp://HOST:PORT",)``.

    Forms (any case and spacing; a tuple reads as its comma-joined items): ``auto`` (the caller's ``gpu_count``
    GPUs, or AUTO_CPU_RANKS CPU ranks; refused when ``gpu_count`` is None); GPU indices ``0,1,3`` or
    ``cuda:0,cuda:1``; ``cpu`` or ``cpu:N`` (N CPU ranks); ``tcp://HOST:PORT`` (refused unless ``attach``).
    :func:`check_visible` then refuses GPUs the caller does not see. ``name``: how errors name the input."""
    raw = text if isinstance(text, str) else ",".join(map(str, text))
    shown = repr(text) if isinstance(text, str) else repr(list(text))
    s = raw.strip().lower().replace(" ", "")
    if s in ("", "auto"):
        if gpu_count is None:
            raise ValueError(f"{name}={shown} depends on the GPUs a process sees; name the devices here "
                             f"(e.g. 'cuda:0,cuda:1' or 'cpu:2').")
        return tuple(f"cuda:{i}" for i in range(gpu_count)) if gpu_count else ("cpu",) * AUTO_CPU_RANKS
    if s.startswith("tcp://"):
        return (_attach_address(raw, shown, name, attach),)
    devices: list[str] = []
    for part in s.split(","):
        m = _DEVICE_RE.fullmatch(part)
        if part and not m:
            raise ValueError(f"{name}={shown}: {part!r} is not a GPU index; {DEVICE_FORMS}.")
        if m and m.group(1) is not None:
            devices.append(f"cuda:{int(m.group(1))}")
        elif m:
            n = int(m.group(2) or 1)
            if n < 1:
                raise ValueError(f"{name}={shown} asks for {n} CPU ranks; use cpu:1 or more.")
            devices += ["cpu"] * n
    if not devices:
        raise ValueError(f"{name}={shown} names no device; {DEVICE_FORMS}.")
    if len({d == "cpu" for d in devices}) > 1:
        raise ValueError(f"{name}={shown} mixes GPUs and CPU ranks; use only GPUs (e.g. '0,1') or only CPU ranks "
                         f"(e.g. 'cpu:2').")
    if devices[0] != "cpu" and len(set(devices)) != len(devices):
        raise ValueError(f"{name}={shown} lists a GPU twice; each rank needs its own GPU.")
    return tuple(devices)


def check_visible(devices: tuple[str, ...], visible: int, *, shown: str, name: str = "devices",
                  seen_by: str = "this process sees", cuda_visible: str | None = None) -> None:
    """Refuse GPUs of :func:`parse_devices`' result that ``seen_by`` does not see: it sees ``visible`` CUDA
    devices under CUDA_VISIBLE_DEVICES=``cuda_visible`` (None: unset). ``shown``: the input as the user wrote it."""
    missing = [d for d in devices if d.startswith("cuda:") and int(d[5:]) >= visible]
    if missing:
        cvd = "unset" if cuda_visible is None else repr(cuda_visible)
        among = f"cuda:0..cuda:{visible - 1}" if visible else "'cpu:N' (no GPU)"
        raise ValueError(f"{name}={shown} names {', '.join(missing)}, but {seen_by} {visible} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={cvd}; in ComfyUI --cuda-device sets it). Use devices among "
                         f"{among}, or make more GPUs visible.")


def _attach_address(raw: str, shown: str, name: str, attach: bool) -> str:
    """``tcp://HOST:PORT`` as given, after the address check of the attach side."""
    if not attach:
        raise ValueError(f"{name}={shown} names a torchrun-started group, but this starts its own ranks: use "
                         f"'auto', GPU indices like '0,1' or 'cpu:N' (attach from ComfyUI's DualParal Loader).")
    try:
        parse_address(raw)
    except ValueError as e:
        raise ValueError(f"{name}={shown}: {e}") from None
    return raw.strip()


def parse_address(text: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` or ``HOST:PORT`` (``[v6]:PORT``) -> (host, port); ValueError naming the form."""
    raw = str(text).strip()
    s = raw[6:] if raw.lower().startswith("tcp://") else raw
    host, _, port = s.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"{raw!r} is not a group address; write it as tcp://HOST:PORT (the --serve address of "
                         f"the torchrun-started group).")
    return host, int(port)
