"""What this machine's CPU offers the fast paths, in words: the vector extensions that oneDNN's packed products
and the few-row kernel are built for (AVX-512 with BW/VL/DQ, its BF16 products, AMX tiles, AVX2's VNNI), read from
/proc/cpuinfo's flags, where there is one, else from torch's own dispatch level. A fast path never turns on from
these words (`calibrate.faster` measures it); they say where a figure or a cached verdict was obtained.

    capability()   # "AVX-512 + BF16 + VNNI"
    describe()     # "AMD EPYC: AVX-512 + BF16 + VNNI, 2 CPUs, 2 torch threads"
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}  # what oneDNN's and ATen's AVX-512 code paths need
TORCH_NAMES = {"AVX512": "AVX-512", "AVX2": "AVX2"}  # torch's dispatch levels; any other is below AVX2 here


@functools.cache
def _cpuinfo(path: Path) -> dict[str, str]:
    """The first processor's fields ("model name", "flags", ...); empty where the file is missing (not Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
    return fields


def flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where the system does not list them."""
    listed = _cpuinfo(CPUINFO).get("flags")
    return frozenset(listed.split()) if listed is not None else None


def model_name() -> str:
    return _cpuinfo(CPUINFO).get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def _torch_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def capability() -> str:
    """"AVX-512", "AVX2" or "no AVX2", then " + BF16" (AVX-512 bf16 products), " + VNNI" (int8 dot products,
    AVX-512's or AVX2's) and " + AMX" (bf16 tiles) where offered; and torch's own level where an override
    (ATEN_CPU_CAPABILITY) or its build keeps its kernels below the CPU's."""
    cpu_flags, torch_level = flags(), TORCH_NAMES.get(_torch_capability(), "no AVX2")
    if cpu_flags is None:
        return torch_level
    base = "AVX-512" if AVX512 <= cpu_flags else "AVX2" if "avx2" in cpu_flags else "no AVX2"
    parts = [base]
    if "avx512_bf16" in cpu_flags:
        parts.append("BF16")
    if cpu_flags & {"avx512_vnni", "avx_vnni"}:
        parts.append("VNNI")
    if {"amx_tile", "amx_bf16"} <= cpu_flags:
        parts.append("AMX")
    levels = ["no AVX2", "AVX2", "AVX-512"]
    below = levels.index(torch_level) < levels.index(base)
    return " + ".join(parts) + (f" (torch's kernels: {torch_level})" if below else "")


def cpus() -> int:
    """The CPUs this process may run on (its affinity), which a container or taskset may keep below the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> str:
    """One line for people: the CPU's model, its capability, the CPUs this process has and torch's threads."""
    return f"{model_name()}: {capability()}, {_count(cpus(), 'CPU')}, {_count(torch.get_num_threads(), 'torch thread')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
