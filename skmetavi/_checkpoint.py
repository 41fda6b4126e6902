"""Atomic, safe-to-load checkpoints of the meta-training state."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


def save(path, state: dict, fingerprint: str) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "state": state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path, fingerprint: str):
    """The saved state, or None if ``path`` does not exist.

    Raises ``ValueError`` if the file was written for other data or settings,
    or is not a skmetavi checkpoint.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # corrupted file or not a checkpoint
        raise ValueError(
            f"Could not read the checkpoint {str(path)!r} ({type(exc).__name__}: {exc}). Delete "
            "it to start over."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is not a skmetavi checkpoint (format {FORMAT_VERSION}).")
    if payload["fingerprint"] != fingerprint:
        raise ValueError(
            f"The checkpoint {str(path)!r} was written for other data or settings than this "
            "meta_fit call (its fingerprint differs). Use the same X, y, groups and parameters "
            "(max_meta_iter, verbose and device may change), or another checkpoint path."
        )
    return payload["state"]
