"""Memory figures for the logs: process RSS (every device) and the CUDA caching allocator.

CUDA peaks are reset after each read, so each logged peak covers one log interval. CUDA keys are
absent, not zero, on other devices.
"""

from __future__ import annotations

import os
import resource
import sys

import psutil
import torch

MB = 1024 * 1024
_process = psutil.Process()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm: dict[int, int] = {}  # pid -> an open /proc/<pid>/statm (a fork gets its own)


def rss_mb() -> float:
    """This process's resident set size. On Linux one read of /proc/self/statm through a descriptor kept
    open (about 2 us; psutil opens and parses the file each time, about 15 us, on every logging step);
    psutil elsewhere."""
    pid = os.getpid()
    fd = _statm.get(pid)
    if fd is None and os.path.exists("/proc/self/statm"):
        fd = _statm[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
    if fd is not None:
        try:
            return int(os.pread(fd, 128, 0).split()[1]) * _PAGE / MB
        except (OSError, IndexError, ValueError):
            pass
    return _process.memory_info().rss / MB


def rss_peak_mb(current_mb: float | None = None) -> float:
    """Peak resident set size of this process so far (the kernel's high-water mark); `current_mb`: an
    RSS figure just read (saves a second read)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    # the kernel's high-water mark can lag the current figure
    return max(peak_mb, rss_mb() if current_mb is None else current_mb)


def cuda_stats(device: torch.device) -> dict[str, int]:
    """The caching allocator's figures dgtrain logs, under torch.cuda.memory_stats' flat names. Read from
    its nested form (`memory_stats` flattens and sorts ~150 entries in Python on each call, ~0.1 ms,
    and the telemetry reads these on every logging step)."""
    nested = torch.cuda.memory.memory_stats_as_nested_dict(device)
    out = {k: nested.get(k, 0) for k in ("num_alloc_retries", "num_ooms")}
    for kind in ("allocated_bytes", "active_bytes", "reserved_bytes"):
        figures = nested.get(kind, {}).get("all", {})
        out[f"{kind}.all.peak"], out[f"{kind}.all.current"] = (
            figures.get("peak", 0),
            figures.get("current", 0),
        )
    return out


def cuda_peak_bytes(device: torch.device) -> dict[str, int]:
    """The caching allocator's peaks since its last reset: allocated, active and reserved bytes."""
    stats = cuda_stats(device)
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
    rss = rss_mb()
    out = {"mem/rss_mb": rss, "mem/rss_peak_mb": rss_peak_mb(rss)}
    if device.type == "cuda":
        stats = cuda_stats(device)
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
