"""The explainers' own trained files (the real-time saliency masker, the healthy-appearance VAE):
a torch-saved dictionary with a ``format`` name and a ``format_version``, read back with every
check and an error that says how to make the file again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.explain.base import ExplainerError


def save_payload(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts: what ``weights_only`` loading reads) to ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return out


def load_payload(path: str | Path, *, what: str, file_format: str, format_version: int, remake: str) -> dict[str, Any]:
    """The dictionary stored at ``path``, checked to be a ``what`` file of ``file_format`` at
    ``format_version``; :class:`ExplainerError` naming the file and ``remake`` (the command that
    writes one) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ExplainerError(f"{what} file not found: {path}; make it with {remake}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not such a file"
        raise ExplainerError(f"cannot read {what} file {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise ExplainerError(f"{path} is not a {what} file (format {file_format!r} expected)")
    if payload.get("format_version") != format_version:
        raise ExplainerError(
            f"{what} file {path} has format version {payload.get('format_version')!r}, this code reads "
            f"{format_version}; make it again with {remake}"
        )
    return payload
