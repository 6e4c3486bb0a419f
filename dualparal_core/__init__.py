"""DualParal engine: block-wise pipelined Wan video sampling over several ranks. Never imports ComfyUI."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

#: The pack's one named logger; it does not propagate to the root logger.
logger = logging.getLogger("DualParal")
logger.propagate = False
if not logger.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("[DualParal] %(levelname)s %(message)s"))
    logger.addHandler(_h)
    logger.setLevel(logging.INFO)
