"""Sliding windows over images and volumes, per axis: which positions each window covers, the box
of a window position, and painting per-window values back onto pixels (voxels). Shared by
occlusion and HiPe."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def window_masks(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[n, size]``: which positions of one axis each window position covers.

    Windows start at ``0, stride, 2*stride, ...``, ``n = ceil((size - window) / stride) + 1``
    of them, as in Captum; when ``size - window`` is not a multiple of ``stride`` the last
    window runs past the border and is cropped there (it is not shifted back inside).
    """
    count = -(-(size - window) // stride) + 1
    starts = torch.arange(count, device=device)[:, None] * stride
    positions = torch.arange(size, device=device)[None, :]
    return (positions >= starts) & (positions < starts + window)


def window_mask(axes: Sequence[torch.Tensor], index: Sequence[torch.Tensor]) -> torch.Tensor:
    """Boolean ``[n, *spatial]``: the boxes of ``n`` window positions, one index tensor ``[n]``
    per axis into that axis's masks ``[count, size]`` (:func:`window_masks`): the outer product of
    one row of each axis, for images (2 axes) and volumes (3) alike."""
    dims = len(axes)
    mask: torch.Tensor | None = None
    for k, (axis, position) in enumerate(zip(axes, index)):
        shape = (len(position),) + tuple(axis.shape[1] if j == k else 1 for j in range(dims))
        part = axis[position].view(shape)
        mask = part if mask is None else mask & part
    assert mask is not None
    return mask


def window_boxes(
    axes: Sequence[torch.Tensor], index: Sequence[torch.Tensor], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``n`` window positions (one index tensor ``[n]`` per axis, as :func:`window_mask`):
    the corner ``[n, d]`` of a ``window``-wide box holding each window (shifted inside the image
    where the window is cropped at the border) and the window's mask in that box ``[n, *box]``."""
    dims = len(axes)
    corners, mask = [], None
    for k, (axis, position) in enumerate(zip(axes, index)):
        box = min(window, axis.shape[1])
        rows = axis[position]  # [n, size]
        first = rows.int().argmax(dim=1).clamp_max(axis.shape[1] - box)
        corners.append(first)
        columns = first[:, None] + torch.arange(box, device=rows.device)
        part = rows.gather(1, columns).view((len(position),) + tuple(box if j == k else 1 for j in range(dims)))
        mask = part if mask is None else mask & part
    assert mask is not None
    return torch.stack(corners, dim=1), mask


def paint_windows(values: torch.Tensor, axes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, n_1, ..., n_d] -> [B, size_1, ..., size_d]``: each pixel (voxel) gets the sum of the
    values of the windows covering it (``axes[k]`` is axis ``k``'s masks ``[n_k, size_k]``)."""
    counts, sizes = "ijk"[: len(axes)], "xyz"[: len(axes)]
    operands = ",".join(f"{c}{s}" for c, s in zip(counts, sizes))
    return torch.einsum(f"b{counts},{operands}->b{sizes}", values, *(axis.to(values.dtype) for axis in axes))
