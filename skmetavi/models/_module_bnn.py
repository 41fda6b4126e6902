"""Bayesian regression with a user's ``torch.nn.Module`` as the network.

The latent ``z`` is the flat vector of the module's trainable parameters, in the
order of ``named_parameters()``.  For ``M`` tasks and ``K`` particles, ``z`` has
shape ``(M, K, n_weights)`` and :func:`torch.func.functional_call` under two
nested :func:`torch.vmap` evaluates all ``M * K`` networks at once, whatever
the architecture.  The likelihoods are those of
:class:`~skmetavi.models.BNNRegression`.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import copy

import torch
from torch.nn.modules.batchnorm import _NormBase

from skmetavi.models._bnn import LIKELIHOODS, _GaussianRegressionHead
from skmetavi.models._targets import Target, _check_scale

__all__ = ["ModuleBNNRegression"]

#: Rows of the probe batch that checks a network's outputs (see ``n_latent``).
_N_PROBE = 4


def _output_contract(likelihood: str) -> str:
    if likelihood == "heteroskedastic":
        return (
            "(n, 2) for likelihood='heteroskedastic' (column 0 the mean, column 1 the raw "
            "noise: sigma = softplus(raw) + 1e-3)"
        )
    return "(n, 1) or (n,) for likelihood='homoskedastic' (the mean)"


def _check_network(network, likelihood):
    """Raise ``TypeError`` / ``ValueError`` for a module that cannot be a BNN's network."""
    contract = (
        "a torch.nn.Module mapping inputs of shape (n, n_features) to outputs of shape "
        + _output_contract(likelihood)
    )
    if isinstance(network, type) and issubclass(network, torch.nn.Module):
        raise TypeError(
            f"network must be {contract}; got the class {network.__qualname__} itself. Pass "
            f"an instance, e.g. network={network.__qualname__}(...)."
        )
    if not isinstance(network, torch.nn.Module):
        raise TypeError(
            f"network must be {contract}, or None for the MLP of hidden_layer_sizes; got "
            f"{type(network).__name__}: {network!r}."
        )
    lazy = [n for n, p in network.named_parameters() if torch.nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"network has uninitialised lazy parameters {lazy[:5]}: their shapes are not known "
            "yet. Run one forward pass first, e.g. network(torch.zeros(1, n_features)), or "
            "use layers with explicit sizes (torch.nn.Linear instead of LazyLinear)."
        )
    if not any(p.requires_grad for p in network.parameters()):
        raise ValueError(
            f"network has no trainable parameters (none with requires_grad=True), but its "
            f"parameters are the Bayesian weights z: got {type(network).__name__} with "
            f"{sum(1 for _ in network.parameters())} parameter tensor(s). Give it at least one "
            "layer with weights (e.g. torch.nn.Linear), or unfreeze them."
        )
    for name, sub in network.named_modules():
        if isinstance(sub, _NormBase):
            raise ValueError(
                f"network contains {name or 'itself'}: {type(sub).__name__}, which normalises "
                "with statistics over the rows of a batch and keeps running statistics in "
                "buffers that a forward pass in training mode updates: a stateful layer that "
                "makes one row's prediction depend on the others (and on minibatching). "
                "Use torch.nn.LayerNorm (per row, no buffers) or remove it."
            )


class ModuleBNNRegression(_GaussianRegressionHead, Target):
    """Regression ``y ~ N(f_z(x), sigma(x)^2)`` with any ``torch.nn.Module`` as ``f``.

    Every trainable parameter of ``network`` (``requires_grad=True``) is a
    Bayesian weight with prior ``N(0, prior_scale^2)``; ``z`` is their flat
    concatenation in the order of ``network.named_parameters()``, each tensor
    flattened row-major.  The ``M x K`` networks are evaluated with
    :func:`torch.func.functional_call` under :func:`torch.vmap`, so any
    architecture whose forward pass is a function of its input, parameters
    and buffers works (skip connections, custom ``forward``, attention over
    features, ...).

    ``network`` itself is never modified: the target works on a deep copy in
    evaluation mode (dropout off: the weight uncertainty is q's).  Parameters
    with ``requires_grad=False`` and floating-point buffers are constants,
    cast to the dtype of ``z``.  Layers that normalise over the rows of a
    batch (batch or instance normalisation) are rejected, and a probe batch
    checks that each row's output depends on that row only.

    Parameters
    ----------
    network : torch.nn.Module
        Maps inputs of shape ``(n, n_features)`` to outputs of shape ``(n, 2)``
        for ``likelihood="heteroskedastic"`` (column 0 the mean, column 1 the
        raw noise, ``sigma = softplus(raw) + 1e-3``), or ``(n, 1)`` / ``(n,)``
        (the mean) for ``likelihood="homoskedastic"``.  Its current parameter
        values are the initial mean of q (:meth:`init_loc`).
    likelihood : {"heteroskedastic", "homoskedastic"}, default="heteroskedastic"
        Noise model, as for :class:`~skmetavi.models.BNNRegression`:
        ``"homoskedastic"`` adds a point-estimated ``log_noise``.
    prior_scale : float, default=1.0
        Prior standard deviation of every weight.

    See Also
    --------
    BNNRegression : The same model with a built-in MLP.
    skmetavi.MetaBNNRegressor : The estimator built on it (``network=...``).

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import ModuleBNNRegression
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> bnn = ModuleBNNRegression(net)
    >>> bnn.n_latent(1)  # 1*8 + 8 + 8*2 + 2
    34
    >>> z = torch.zeros(3, 5, 34)  # 3 tasks, 5 particles
    >>> mean, scale = bnn.forward(z, torch.randn(3, 10, 1), {})
    >>> mean.shape
    torch.Size([3, 5, 10])
    """

    requires_y = True
    has_likelihood = True

    def __init__(self, network, likelihood="heteroskedastic", prior_scale=1.0):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}.")
        _check_network(network, likelihood)
        _check_scale("prior_scale", prior_scale, "ModuleBNNRegression")
        self.network = network
        self.likelihood = likelihood
        self.prior_scale = prior_scale
        # A private copy: functional_call swaps tensors in and out of the module it is
        # given, and eval() changes its mode; the user's object is never touched.
        self._module = copy.deepcopy(network).eval()
        weights = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in weights]
        self._shapes = [p.shape for _, p in weights]
        self._numels = [p.numel() for _, p in weights]
        # (n_weights,): the module's own values, the initial mean of q.
        self._init = torch.cat([p.detach().reshape(-1) for _, p in weights])
        frozen = [(n, p) for n, p in self._module.named_parameters() if not p.requires_grad]
        self._constants = {n: t.detach() for n, t in [*frozen, *self._module.named_buffers()]}
        self._checked = set()

    # -------------------------------------------------------------- shapes
    def n_latent(self, n_features):
        """Return the number of Bayesian weights, after checking the network's outputs.

        A probe batch of shape ``(4, n_features)`` goes through the batched
        forward pass: it must run under :func:`torch.vmap`, give outputs of
        the documented shape, and give each row an output that does not
        depend on the other rows.

        Parameters
        ----------
        n_features : int
            Number of columns of ``X``.

        Returns
        -------
        n_latent : int
            Number of trainable parameters of ``network``.
        """
        if n_features not in self._checked:
            self._check_outputs(n_features)
            self._checked.add(n_features)
        return int(self._init.numel())

    def _check_outputs(self, n_features):
        gen = torch.Generator().manual_seed(0)
        X = torch.randn((_N_PROBE, n_features), generator=gen, dtype=self._init.dtype)
        X = X.to(self._init.device)
        z = self._init.reshape(1, 1, -1)
        name = type(self.network).__name__
        try:
            with torch.no_grad():
                out = self._outputs(z, X.unsqueeze(0))[0, 0]
                tail = self._outputs(z, X[2:].unsqueeze(0))[0, 0]
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"network ({name}) failed on a batch of inputs of shape ({_N_PROBE}, "
                f"{n_features}) under torch.func.functional_call and torch.vmap: "
                f"{type(exc).__name__}: {exc}. network must map inputs of shape (n, "
                f"n_features) to outputs of shape {_output_contract(self.likelihood)}, "
                "with torch operations only (no .item(), in-place updates of its own "
                "tensors, random draws or control flow that depends on values)."
            ) from exc
        widths = (2,) if self.likelihood == "heteroskedastic" else (1, None)
        ok = out.shape[:1] == (_N_PROBE,) and (
            (out.dim() == 1 and None in widths) or (out.dim() == 2 and out.shape[1] in widths)
        )
        if not ok:
            hint = (
                "Give its last layer 2 outputs, or use likelihood='homoskedastic'."
                if self.likelihood == "heteroskedastic"
                else "Give its last layer 1 output, or use likelihood='heteroskedastic' "
                "for 2 outputs (mean, raw noise)."
            )
            raise ValueError(
                f"network ({name}) maps inputs of shape ({_N_PROBE}, {n_features}) to outputs "
                f"of shape {tuple(out.shape)}, but it must give "
                f"{_output_contract(self.likelihood)}. {hint}"
            )
        if not out.is_floating_point() or not torch.isfinite(out).all():
            raise ValueError(
                f"network ({name}) gives non-finite or non-floating outputs ({out.dtype}) at its "
                "initial parameters, which are the initial mean of q; initialise it so that "
                "it gives finite predictions."
            )
        scale = 1.0 + float(out.abs().max())
        if not torch.allclose(out[2:], tail, rtol=1e-3, atol=1e-4 * scale):
            raise ValueError(
                f"network ({name}) gives a row an output that depends on the other rows of the "
                "batch (rows 2-3 of a probe batch differ when evaluated without rows 0-1). "
                "The likelihood is a product over independent rows and predictions are "
                "made in chunks of rows, so each row's output must depend on that row only: "
                "remove layers that mix rows (normalisation or attention over the batch)."
            )

    def init_loc(self, n_tasks, n_features, *, generator, dtype, device):
        """Initial means of q: the network's own parameter values, for every task.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M.
        n_features : int
            Input dimension.
        generator : torch.Generator
            Unused: the initialisation is the network's, not a random draw.
        dtype : torch.dtype
            Floating-point type.
        device : torch.device or str
            Device of the result.

        Returns
        -------
        loc : torch.Tensor of shape (n_tasks, n_weights)
            The flat parameters of ``network``, in ``named_parameters()`` order.
        """
        loc = self._init.to(device=device, dtype=dtype)
        return loc.unsqueeze(0).expand(n_tasks, -1).clone()

    # ------------------------------------------------------------- forward
    def _outputs(self, z, X):
        """The raw network outputs, (M, K, n, n_out) or (M, K, n)."""
        constants = {
            k: v.to(device=z.device, dtype=z.dtype) if v.is_floating_point() else v.to(z.device)
            for k, v in self._constants.items()
        }

        def one(w, x):  # w (n_weights,), x (n, n_features): one network on one task's rows
            tensors = {
                name: t.reshape(shape)
                for name, t, shape in zip(self._names, w.split(self._numels), self._shapes)
            }
            return torch.func.functional_call(self._module, {**tensors, **constants}, (x,))

        # Inner vmap: the K particles share their task's rows; outer: the M tasks.
        return torch.vmap(torch.vmap(one, in_dims=(0, None)), in_dims=(0, 0))(z, X)

    def forward(self, z, X, params):
        """Evaluate the M x K networks.

        Parameters
        ----------
        z : torch.Tensor of shape (M, K, n_weights)
            Weights of each task's particles.
        X : torch.Tensor of shape (M, n, n_features)
            Inputs of each task.
        params : dict of str to torch.Tensor
            Model parameters (``log_noise`` for the homoskedastic likelihood).

        Returns
        -------
        mean : torch.Tensor of shape (M, K, n)
            Predictive means.
        scale : torch.Tensor of shape (M, K, n)
            Noise standard deviations.
        """
        return self._mean_scale(self._outputs(z, X), params)
