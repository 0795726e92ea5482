"""The switch between the layers' closed-form backward and autograd's (one place, below every layer)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["closed_form_backward", "closed_form_enabled"]

_CLOSED_FORM = [True]


@contextlib.contextmanager
def closed_form_backward(enabled: bool = True):
    """Turn the layers' closed-form backward (:class:`lstainnorm.layers.norm.StandardiseFunction`,
    :class:`lstainnorm.layers.fusion.FusionFunction`, :class:`lstainnorm.layers.stain.StainODFunction`)
    on or off inside a ``with`` block.

    On by default; off, eager training goes through autograd (what the benchmarks and tests
    compare against). The closed-form functions are once differentiable: a double backward
    (``create_graph=True``, e.g. a gradient penalty on the input) needs it off. Not thread-local.
    """
    before = _CLOSED_FORM[0]
    _CLOSED_FORM[0] = bool(enabled)
    try:
        yield
    finally:
        _CLOSED_FORM[0] = before


def closed_form_enabled() -> bool:
    """Whether eager training uses the closed-form backward here (grad mode on, not tracing)."""
    return _CLOSED_FORM[0] and torch.is_grad_enabled() and not torch.compiler.is_compiling()
