"""Host-to-device transfer of the small integer arrays a batch needs, in one copy."""

from __future__ import annotations

import numpy as np
import torch


def copy_once(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Integer arrays to `device` as one int64 buffer copied once (from pinned memory and
    without waiting, on a GPU), then cut into views."""
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()]).astype(np.int64))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    out, start = {}, 0
    for name, array in arrays.items():
        out[name] = flat[start : start + array.size].view(array.shape)
        start += array.size
    return out
