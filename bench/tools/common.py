"""What the tools share: the header of versions and the device they ran on."""

from __future__ import annotations

import os

from bench import package_versions

TOOL_PACKAGES = ("torch", "deepspeed", "ray", "transformers")


def versions(device: str, extra: tuple[str, ...] = ()) -> dict:
    """Package versions (bench.package_versions) and the device: its name, and on CUDA its capability,
    memory and CUDA version; the CPU's core count."""
    import torch

    out = {**package_versions(TOOL_PACKAGES + extra), "cpus": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        import platform

        out["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return out
