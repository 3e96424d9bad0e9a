"""Where torch work runs: ``pick("auto" | "cpu" | "cuda") -> torch.device``.

What: "auto" is CUDA when torch sees a GPU, else CPU; "cuda" without a GPU is an ``EdgekitError``
naming the fix. ``where(device)`` is the string a report records ("cpu", "cuda:0 (NVIDIA H200)").
Used by calibration statistics, importance, smoothing statistics, distillation and torch-side
evaluation; onnxruntime validation always runs on the CPU it measures.
"""

from __future__ import annotations

from .errors import EdgekitError

DEVICES = ("auto", "cpu", "cuda")


def pick(device: str = "auto"):
    import torch

    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise EdgekitError(f"device={device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EdgekitError("device='cuda' but torch sees no CUDA GPU; use --device auto or cpu "
                           "(or install a CUDA build of torch)")
    return torch.device("cuda", torch.cuda.current_device())


def where(device) -> str:
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return f"{d.type}:{d.index or 0} ({torch.cuda.get_device_name(d)})"
    return d.type
