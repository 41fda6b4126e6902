"""The one training loop of ``fit`` and ``meta_fit``: progress bar, Ctrl-C, non-finite errors."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from dataclasses import dataclass

from skmetavi._inner import NonFiniteError


def progress_bar(total, verbose, desc):
    """A tqdm bar when ``verbose`` (None otherwise)."""
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


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
    """

    n_done: int = 0
    interrupted: bool = False
    in_step: bool = False


def train_loop(step, n_steps, *, verbose, desc, value_name, settings, after_step=None):
    """Call ``step()`` ``n_steps`` times with a progress bar; keep the progress on Ctrl-C.

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
        Called with the number of completed steps after each step (checkpoints).

    Returns
    -------
    result : LoopResult
    """
    bar = progress_bar(n_steps, verbose, desc)
    result = LoopResult()
    try:
        for _ in range(n_steps):
            result.in_step = True
            value = step()
            result.in_step = False
            result.n_done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({value_name: f"{value:.4g}"})
            if after_step is not None:
                after_step(result.n_done)
    except KeyboardInterrupt:
        result.interrupted = True
    except NonFiniteError as exc:
        raise NonFiniteError(f"{desc} stopped: {exc} (settings: {settings()})") from exc
    finally:
        if bar is not None:
            bar.close()
    if not result.interrupted:
        result.in_step = False
    return result
