"""Whether the Hugging Face hub can be reached: asked before any hub lookup, because an offline machine
otherwise waits out transformers' retries (~40 s) before failing."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 2.0) -> bool:
    """False under ``HF_HUB_OFFLINE=1`` or when the hub's host does not answer within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
