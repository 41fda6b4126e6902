"""The one training loop of ``fit`` and ``meta_fit``: progress, Ctrl-C, stops, non-finite errors.

Also the pieces both callers share: the history records' learned scalars, the
progress lines written beside the tqdm bar, and the check that a loss did not
end far above where it started.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import statistics
import sys
import time
from dataclasses import dataclass

from skmetavi._inner import NonFiniteError

#: A loss "ends far worse than it started" when the median of its last ``END_FRACTION``
#: iterations exceeds its first value by more than ``BLOW_UP_FACTOR * max(|first|, 1)``,
#: judged only on curves of at least ``BLOW_UP_MIN_POINTS`` finite values.  A real
#: divergence moves the loss by orders of magnitude (1e3 -> 1e12 for a BNN at
#: ``inner_lr=1e6``); a few noisy Monte Carlo iterations can move it by 2-3x
#: (1.7 -> 4.5 in a 3-iteration KL fit), which must not warn.
END_FRACTION = 0.1
BLOW_UP_FACTOR = 3.0
BLOW_UP_MIN_POINTS = 5


def progress_bar(total, verbose, desc):
    """A tqdm bar when ``verbose`` (None otherwise)."""
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def write(message):
    """One progress line on stderr, beside any open tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def fmt(value):
    """A number for a progress line (4 significant digits; ``-`` for None)."""
    return "-" if value is None else f"{value:.4g}"


def nanmean(values):
    """Mean of the finite ``values`` (None if there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def divergence_scalars(divergence):
    """The divergence's learnable scalars by name, e.g. ``{"alpha": 0.87}`` for Rényi.

    Every 0-d parameter that requires grad; ``raw_NAME`` is reported as the
    constrained ``NAME`` when the divergence exposes it as a number (Rényi's
    ``alpha = softplus(raw_alpha)``).  Networks (NeuralF) have none.
    """
    out = {}
    for name, p in divergence.named_parameters():
        if not p.requires_grad or p.dim() != 0:
            continue
        public = name[len("raw_"):] if name.startswith("raw_") else name
        value = getattr(divergence, public, None) if "." not in public else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[public] = float(value)
        else:
            out[name] = float(p.detach())
    return out


def trend(curve):
    """``(first, end)`` of the finite values of ``curve``, None under ``BLOW_UP_MIN_POINTS``.

    ``end`` is the median of the last ``END_FRACTION`` of the finite values (at
    least one), which Monte Carlo noise barely moves; ``first`` is the first.
    """
    values = [float(v) for v in curve if v is not None and math.isfinite(v)]
    if len(values) < BLOW_UP_MIN_POINTS:
        return None
    end = statistics.median(values[-max(1, math.ceil(END_FRACTION * len(values))):])
    return values[0], end


def blow_up(curve):
    """``(first, end)`` of :func:`trend` if the loss ``curve`` ended far above its first value.

    ``first`` is the loss of the starting point; None if the curve did not blow
    up or is too short to judge.
    """
    found = trend(curve)
    if found is not None and found[1] - found[0] > BLOW_UP_FACTOR * max(abs(found[0]), 1.0):
        return found
    return None


@dataclass
class LoopResult:
    """What :func:`train_loop` did.

    Attributes
    ----------
    n_done : int
        Steps completed.
    interrupted : bool
        Whether ``KeyboardInterrupt`` stopped the loop (the progress so far is kept).
    in_step : bool
        Whether the interrupt came inside ``step`` (which may then have been half
        applied), rather than between steps.
    stopped : bool
        Whether ``after_step`` asked to stop (a callback, or no task left to run).
    seconds : float
        Wall time of the loop.
    """

    n_done: int = 0
    interrupted: bool = False
    in_step: bool = False
    stopped: bool = False
    seconds: float = 0.0


def train_loop(step, n_steps, *, verbose, desc, value_name, settings, after_step=None,
               postfix=None, summary=None):
    """Call ``step()`` up to ``n_steps`` times with a progress bar; keep the progress on Ctrl-C.

    Parameters
    ----------
    step : callable
        One iteration; returns a float shown in the bar as ``value_name``.
    n_steps : int
    verbose : int
        A tqdm bar if > 0.
    desc : str
        The bar's label and the prefix of errors (``"fit"``, ``"meta_fit"``).
    value_name : str
    settings : callable
        ``settings() -> str`` appended to a :class:`NonFiniteError`'s message.
    after_step : callable, default=None
        ``after_step(n_done, value, started) -> bool`` after each step (history,
        callbacks, checkpoints), ``started`` being ``time.perf_counter()`` at the
        start of the iteration; True stops the loop (``result.stopped``).
    postfix : callable, default=None
        ``postfix() -> dict``: more fields of the bar.
    summary : callable, default=None
        ``summary(result) -> str``: the line written to stderr when the loop ends
        (``verbose > 0``; not after an error).

    Returns
    -------
    result : LoopResult
    """
    bar = progress_bar(n_steps, verbose, desc)
    result = LoopResult()
    t_start = time.perf_counter()
    try:
        for _ in range(n_steps):
            started = time.perf_counter()
            result.in_step = True
            value = step()
            result.in_step = False
            result.n_done += 1
            if bar is not None:
                # The bar counts the iteration before after_step writes its lines beside it.
                bar.update(1)
            stop = bool(after_step(result.n_done, value, started)) if after_step else False
            if bar is not None:
                fields = {value_name: fmt(value)}
                if postfix is not None:
                    fields.update(postfix())
                bar.set_postfix(fields)
            if stop:
                result.stopped = True
                break
    except KeyboardInterrupt:
        result.interrupted = True
    except NonFiniteError as exc:
        raise NonFiniteError(f"{desc} stopped: {exc} (settings: {settings()})") from exc
    finally:
        if bar is not None:
            bar.close()
        result.seconds = time.perf_counter() - t_start
    if not result.interrupted:
        result.in_step = False
    if verbose and summary is not None:
        write(summary(result))
    return result
