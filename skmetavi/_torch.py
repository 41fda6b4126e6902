"""The only crossing between numpy and torch, plus RNG and device helpers."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """Map ``"float32"``/``"float64"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
        return dtype
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}."
        ) from None


def resolve_device(device) -> torch.device:
    """Return a ``torch.device``, with a clear error when it is unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be a torch device string such as 'cpu' or 'cuda', "
            f"got {device!r}."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available on this "
            "machine; use device='cpu'."
        )
    return dev


def as_tensor(X, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Convert a validated ndarray (or tensor) to a tensor on ``device``."""
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=dtype)
    X = np.asarray(X)
    if not X.flags.writeable or any(st < 0 for st in X.strides):
        # torch cannot share a read-only buffer (e.g. a read-only memory map) and warns,
        # and refuses negative strides (a reversed view such as X[::-1]).
        X = X.copy()
    return torch.as_tensor(X, dtype=dtype, device=device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach a tensor and return it as a float64 ndarray on the CPU."""
    return t.detach().to("cpu", torch.float64).numpy()


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed``; the global RNG is untouched."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def seed_from_random_state(rng: np.random.RandomState) -> int:
    """Draw a 63-bit seed from a numpy ``RandomState``."""
    return int(rng.randint(0, 2**31 - 1)) * (2**31) + int(rng.randint(0, 2**31 - 1))
