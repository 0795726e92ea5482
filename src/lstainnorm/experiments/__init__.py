"""Experiments: the demo behind ``lstainnorm demo`` and what comparisons share.

- :mod:`.runner`        the resumable loop over training runs, method names, tables
- :mod:`.demo`          ``make demo``: four methods on the synthetic multi-centre set

The data-set benchmarks (AMi-Br, MoNuSeg, ...) live beside the package in ``benchmarks/``.
Importing this package has no side effects (no global warning filters, no patched modules).
"""
