"""Memory figures for the logs: process RSS (every device) and the CUDA caching allocator.

CUDA peaks are reset after each read, so each logged peak covers one log interval. CUDA keys are
absent, not zero, on other devices.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch

MB = 1024 * 1024
_process = psutil.Process()


def rss_mb() -> float:
    return _process.memory_info().rss / MB


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    return max(peak_mb, rss_mb())  # the kernel's high-water mark can lag the current figure


def cuda_peak_bytes(device: torch.device) -> dict[str, int]:
    """The caching allocator's peaks since its last reset: allocated, active and reserved bytes."""
    stats = torch.cuda.memory_stats(device)
    return {
        "allocated": stats.get("allocated_bytes.all.peak", 0),
        "active": stats.get("active_bytes.all.peak", 0),
        "reserved": stats.get("reserved_bytes.all.peak", 0),
    }


def memory_metrics(
    device: torch.device, reset_peak: bool = True, earlier_peaks: dict[str, int] | None = None
) -> dict[str, float]:
    """RSS always; on CUDA also the allocator's current use, its peaks since the last reset (merged with
    `earlier_peaks`, peaks read and reset in between by the telemetry's phase probes), the peak reserved
    as a percentage of the device's capacity, and the allocator's cumulative retry and OOM counts."""
    out = {"mem/rss_mb": rss_mb(), "mem/rss_peak_mb": rss_peak_mb()}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        earlier = earlier_peaks or {}
        peak = max(stats.get("allocated_bytes.all.peak", 0), earlier.get("allocated", 0))
        active = max(stats.get("active_bytes.all.peak", 0), earlier.get("active", 0))
        reserved = max(stats.get("reserved_bytes.all.peak", 0), earlier.get("reserved", 0))
        capacity = torch.cuda.get_device_properties(device).total_memory
        out["mem/cuda_alloc_mb"] = stats.get("allocated_bytes.all.current", 0) / MB
        out["mem/cuda_reserved_mb"] = stats.get("reserved_bytes.all.current", 0) / MB
        out["mem/cuda_peak_mb"] = peak / MB
        out["mem/cuda_active_peak_mb"] = active / MB
        out["mem/cuda_peak_reserved_pct"] = 100.0 * reserved / capacity
        out["mem/cuda_alloc_retries"] = stats.get("num_alloc_retries", 0)
        out["mem/cuda_ooms"] = stats.get("num_ooms", 0)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
    return out
