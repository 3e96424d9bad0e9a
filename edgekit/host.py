"""Facts about the machine a validation runs on, and whether it can represent a target.

What: ``host_facts()`` (CPU model, logical cores usable by this process, architecture, ISA flags
that decide int8 speed — AVX2, AVX-512, VNNI, AMX, NEON dot-product — memory, onnxruntime version);
``latency_unverified_reason(target, facts)`` says why latency on this host says nothing about the
target (user-mode emulation, fewer cores than the target's threads, another CPU architecture), or None.

No torch import: this runs on devices through ``edgekit.runtime``.
"""

from __future__ import annotations

import os
import platform

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _cpuinfo() -> tuple[str, set[str], str]:
    """(CPU model, ISA flags, the key the flags came from: "flags" on x86, "Features" on arm)."""
    model, flags, key_seen = "", set(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and not model:
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags, key_seen = set(val.split()), key
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags, key_seen


def emulation(machine: str, flags_key: str, flags: set[str]) -> str | None:
    """Why this process runs under user-mode emulation (qemu-user shows the host's /proc/cpuinfo),
    or None: an arm64 process reading x86 CPU flags, or the reverse."""
    fam = _arch_family(machine)
    if fam == "arm64" and flags_key == "flags" and "sse2" in flags:
        return "arm64 process on an x86-64 CPU (user-mode emulation, e.g. qemu-user)"
    if fam == "x86_64" and flags_key == "Features" and "asimd" in flags:
        return "x86-64 process on an arm64 CPU (user-mode emulation)"
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def host_facts() -> dict:
    import onnxruntime as ort

    model, flags, flags_key = _cpuinfo()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    emu = emulation(platform.machine(), flags_key, flags)
    if emu:                      # the flags are the host CPU's, not what the emulated process can use
        model, flags = f"{platform.machine()} emulated on {model}", set()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "memory_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "emulated": emu,
    }


def _arch_family(machine: str) -> str:
    m = machine.lower()
    return "arm64" if m in ("arm64", "aarch64") else "x86_64" if m in ("x86_64", "amd64") else m


def latency_unverified_reason(target, facts: dict) -> str | None:
    if facts.get("emulated"):
        return (f"host is emulated ({facts['emulated']}): latency says nothing about {target.name}; "
                "validate on the device")
    if facts["cores"] < target.threads:
        return (f"host has {facts['cores']} usable cores, target {target.name} runs {target.threads} threads; "
                f"run `edgekit validate` on a >= {target.threads}-core machine")
    if target.arch != "any" and _arch_family(facts["arch"]) != target.arch:
        return f"host is {facts['arch']}, target {target.name} is {target.arch}; validate on the device"
    if target.ops == "web":
        return "web target: latency must be measured in the browser (sample_apps/web)"
    return None
