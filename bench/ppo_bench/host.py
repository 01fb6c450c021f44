"""What a benchmark ran on: the CPU's model and bf16 flags, cores and memory, and its measured memory bandwidth."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024**2, 1),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "python": sys.version.split()[0],
    }


def write_result(name: str, args, fields: dict) -> dict:
    """A benchmark's result - when, its arguments, the machine, torch and transformers versions, then ``fields`` -
    written atomically to ``args.out`` (default: bench/results/<name>_<date>.json); returns it."""
    import datetime
    import json
    from importlib import metadata

    from rlhf_core.records import atomic_write_text

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args), "machine": machine(),
        "versions": {package: metadata.version(package) for package in ("torch", "transformers")}, **fields,
    }  # fmt: skip
    out = Path(args.out or Path(__file__).resolve().parents[1] / "results" / f"{name}_{datetime.date.today()}.json")
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of copying a ``mib`` MiB fp32 tensor into another (bytes read plus bytes written), after a warm-up.

    Far larger than any cache, so it is what a decode step pays to stream the weights from memory.
    """
    import torch

    source = torch.ones(mib * 2**18)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best
