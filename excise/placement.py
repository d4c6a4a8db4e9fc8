"""Where a model runs and in which number format: ``device`` / ``dtype`` / ``device_map``.

Every stage follows the model: batches go to the device that takes the input tokens
(:attr:`ModelHandle.device`), accumulators to the device of the parameter or activation they
sum, and sums that need precision (Fisher, gradient ratios, leave-one-out statistics, diffs'
checksums and fingerprints) are kept in float32 or float64 whatever the model's dtype. This
module only turns a user's words (``"auto"``, ``"bf16"``, ``"cuda:1"``) into torch values, with
errors that name the valid choices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# the names a config or the CLI may use for a dtype; "auto" keeps what the model has
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DEVICE_TYPES = ("auto", "cpu", "cuda", "mps", "xpu")


def best_device() -> torch.device:
    """``"auto"``: the first CUDA GPU when one is present, else the CPU. Apple's MPS is never
    chosen for you: it has no float64, which SSD's dampening factors, noise draws and projection
    statistics use; ask for ``"mps"`` explicitly to try it (not verified)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_device(value: str | torch.device | None) -> torch.device | None:
    """``None`` (leave the model where it is), ``"auto"``, or a torch device (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"``) that this machine has."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ValueError(f"device={value!r}: give a device name such as 'auto', 'cpu', "
                         f"'cuda' or 'cuda:1'")
    if value == "auto":
        return best_device()
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"device={value!r} is not a device; choose one of "
                         f"{', '.join(DEVICE_TYPES)} (with an index, e.g. 'cuda:1')") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device={value!r}: this machine has no CUDA GPU (torch "
                             f"{torch.__version__}); use 'cpu' or 'auto'")
        if device.index is not None and device.index >= n:
            raise ValueError(f"device={value!r}: this machine has {n} CUDA GPU(s), "
                             f"cuda:0..cuda:{n - 1}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                       and torch.backends.mps.is_available()):
        raise ValueError(f"device={value!r}: MPS is not available here; use 'cpu' or 'auto'")
    return device


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` / ``"auto"`` (keep the model's own), or a floating dtype by torch value or by
    name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"dtype={value}: a model's weights need a floating dtype; choose "
                             f"one of {sorted(DTYPES)}")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype={value!r}: choose one of 'auto', {', '.join(sorted(DTYPES))}")


def check_device_map(device_map) -> str | dict | None:
    """A Hugging Face / accelerate ``device_map``: ``None``, ``"auto"`` / ``"balanced"`` /
    ``"balanced_low_0"`` / ``"sequential"``, or a mapping ``{module name: device}`` whose devices
    are an index, ``"cpu"``, ``"cuda:N"``, ``"mps"`` or ``"disk"``."""
    strategies = ("auto", "balanced", "balanced_low_0", "sequential")
    if device_map is None or device_map in strategies:
        return device_map
    if isinstance(device_map, Mapping) and device_map:
        for module, where in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map: module name {module!r} must be a string")
            if isinstance(where, bool) or not isinstance(where, (int, str, torch.device)):
                raise ValueError(f"device_map[{module!r}]={where!r}: give a GPU index, 'cpu', "
                                 f"'cuda:N', 'mps' or 'disk'")
            if isinstance(where, str) and where != "disk":
                resolve_device(where)
        return dict(device_map)
    raise ValueError(f"device_map={device_map!r}: choose one of {', '.join(strategies)} or "
                     f"give a mapping {{module name: device}}")


def devices_of(model: torch.nn.Module) -> list[torch.device]:
    """The distinct devices holding ``model``'s parameters, in first-seen order."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        seen.setdefault(p.device, None)
    return list(seen)
