"""`fast.cpu`: the CPU's capability from its flags (or torch's level), and the one-line description."""

import os
import platform
from pathlib import Path

import pytest
import torch

from med_train.fast import cpu

SKYLAKE = {"avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512vl", "avx512dq"}
SAPPHIRE_RAPIDS = SKYLAKE | {"avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile amx_bf16

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


@pytest.mark.parametrize("flags, torch_level, expected", [
    ({"avx", "avx2", "fma"}, "AVX2", "AVX2"),
    ({"avx", "avx2", "avx_vnni"}, "AVX2", "AVX2 + VNNI"),  # Alder Lake's int8 dot products
    (SKYLAKE, "AVX512", "AVX-512"),
    (SKYLAKE | {"avx512_vnni"}, "AVX512", "AVX-512 + VNNI"),
    (SKYLAKE | {"avx512_bf16", "avx512_vnni"}, "AVX512", "AVX-512 + BF16 + VNNI"),  # Zen 4
    (SAPPHIRE_RAPIDS, "AVX512", "AVX-512 + BF16 + VNNI + AMX"),
    ({"avx2", "avx512f", "avx512cd"}, "AVX2", "AVX2"),  # AVX-512 Foundation alone is not what the paths use
    ({"sse4_2", "avx"}, "DEFAULT", "no AVX2"),
    (SKYLAKE, "AVX2", "AVX-512 (torch's kernels: AVX2)"),  # e.g. ATEN_CPU_CAPABILITY=avx2
    (None, "AVX512", "AVX-512"),  # no /proc/cpuinfo: torch's level
    (None, "AVX2", "AVX2"),
    (None, "DEFAULT", "no AVX2"),
    (None, "SVE256", "no AVX2"),
])
def test_capability_from_the_flags(monkeypatch, flags, torch_level, expected):
    monkeypatch.setattr(cpu, "flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(cpu, "_torch_capability", lambda: torch_level)
    assert cpu.capability() == expected


def test_the_first_processor_of_cpuinfo_is_read(monkeypatch, tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(cpu, "_torch_capability", lambda: "AVX512")
    assert cpu.model_name() == "Intel(R) Xeon(R) Platinum 8480+"
    assert "amx_tile" in cpu.flags() and "fpu" in cpu.flags() and len(cpu.flags()) == 12
    monkeypatch.setattr(cpu, "cpus", lambda: 112)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.describe() == "Intel(R) Xeon(R) Platinum 8480+: AVX-512 + BF16 + AMX, 112 CPUs, 2 torch threads"
        torch.set_num_threads(1)
        assert cpu.describe().endswith("AMX, 112 CPUs, 1 torch thread")
    finally:
        torch.set_num_threads(threads)


def test_without_cpuinfo_the_platform_names_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    monkeypatch.setattr(cpu, "_torch_capability", lambda: "DEFAULT")
    assert cpu.flags() is None and cpu.model_name() == "arm"
    assert cpu.describe().startswith("arm: no AVX2, ")


def test_cpus_are_those_this_process_may_use():
    assert 1 <= cpu.cpus() <= os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cpu.cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc")
def test_this_machine_agrees_with_torch():
    """The flags and torch's own detection (cpuinfo's CPUID) see the same CPU: torch's AVX-512 level means the
    flags hold AVX-512, and the description names the model from /proc/cpuinfo."""
    level = torch.backends.cpu.get_cpu_capability()
    if level in cpu.TORCH_NAMES:  # the level itself, or noted as torch's where an override keeps it lower
        assert cpu.TORCH_NAMES[level] in cpu.capability()
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    if names:
        assert cpu.describe().startswith(f"{names[0]}: ")
