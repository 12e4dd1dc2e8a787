"""What kind of machine we are on: decides the defaults (dtype, engine resources, training backend)."""

from __future__ import annotations


def cluster_has_gpus() -> bool:
    """True when the connected Ray cluster (or, without Ray, this machine) has a GPU."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
