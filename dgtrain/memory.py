"""Memory figures for the logs: process RSS (every device) and the CUDA caching allocator.

CUDA peaks are reset after each read, so each logged peak covers one log interval.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch

_MB = 1024 * 1024
_process = psutil.Process()


def rss_mb() -> float:
    return _process.memory_info().rss / _MB


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_metrics(device: torch.device, reset_peak: bool = True) -> dict[str, float]:
    out = {"mem/rss_mb": rss_mb(), "mem/rss_peak_mb": rss_peak_mb()}
    if device.type == "cuda":
        out["mem/cuda_alloc_mb"] = torch.cuda.memory_allocated(device) / _MB
        out["mem/cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / _MB
        out["mem/cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / _MB
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
    return out
