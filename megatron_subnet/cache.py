"""Where fetched third-party data (corpora, teacher weights) lives."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEGATRON_SUBNET_CACHE"


def cache_dir() -> Path:
    """``$MEGATRON_SUBNET_CACHE`` if set, else ``~/.cache/megatron_subnet``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_subnet"
