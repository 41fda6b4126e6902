"""Atomic, safe-to-load checkpoints of the meta-training state."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 2


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


def check_path(path) -> None:
    """Raise a clear error unless ``path`` is a file path (``str`` or ``os.PathLike``)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint must be a file path (str or os.PathLike), got "
            f"{type(path).__name__} {path!r:.60}; e.g. checkpoint='meta_fit.ckpt'."
        )
    if Path(path).is_dir():
        raise ValueError(
            f"checkpoint {str(path)!r} is a directory; pass a file path inside it, e.g. "
            f"{str(Path(path) / 'meta_fit.ckpt')!r}."
        )


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
            f"Could not read the checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the "
            "file is corrupted, truncated or not a skmetavi checkpoint. Delete it to start "
            "over, or pass another checkpoint path."
        ) from exc
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT_VERSION
        or not {"fingerprint", "state"} <= payload.keys()
    ):
        found = (
            f"format {payload.get('format')!r}"
            if isinstance(payload, dict)
            else f"a {type(payload).__name__}"
        )
        raise ValueError(
            f"{str(path)!r} is not a skmetavi checkpoint of format {FORMAT_VERSION} (found "
            f"{found}). Delete it to start over, or pass another checkpoint path."
        )
    if payload["fingerprint"] != fingerprint:
        raise ValueError(
            f"The checkpoint {str(path)!r} was written for other data or settings than this "
            "meta_fit call (its fingerprint differs). Use the same X, y, groups and parameters "
            "(max_meta_iter, max_iter, verbose, device and task_chunk_size may change), or another checkpoint path."
        )
    return payload["state"]
