"""Where the project keeps its state on disk. Every path can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Models and downloads (`TUNESERVE_CACHE`, default `~/.cache/tuneserve`)."""
    return Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve")).expanduser()


def ray_dir() -> Path:
    """The local Ray head's temp dir (`TUNESERVE_RAY_DIR`). Kept short: Ray's unix socket paths must fit 107 bytes."""
    return Path(os.environ.get("TUNESERVE_RAY_DIR", f"/tmp/tuneserve-ray-{os.getuid()}")).expanduser()
