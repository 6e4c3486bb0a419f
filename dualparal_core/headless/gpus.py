"""How many CUDA devices this process would see, counted without importing torch (a fast, early answer; the
workers' own count is checked again before they start)."""

from __future__ import annotations

import os
import shutil
import subprocess


def physical_gpus() -> int:
    """NVIDIA GPUs the driver shows: /proc/driver/nvidia/gpus, else ``nvidia-smi -L``; 0 without a driver."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def visible_gpus(env: dict[str, str] | None = None) -> int:
    """GPUs CUDA would enumerate under CUDA_VISIBLE_DEVICES (CUDA stops at the first entry it cannot use)."""
    env = os.environ if env is None else env
    n = physical_gpus()
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None or n == 0:
        return n
    count = 0
    for item in cvd.split(","):
        item = item.strip()
        if item.isdigit() and int(item) < n or item.startswith(("GPU-", "MIG-")):
            count += 1
        else:
            break
    return min(count, n)
