"""Experiments: the demo and the benchmarks behind ``lstainnorm demo`` and ``lstainnorm bench``.

- :mod:`.runner`        the resumable loop over training runs, method names, tables
- :mod:`.demo`          ``make demo``: four methods on the synthetic multi-centre set
- :mod:`.speed`         ms per tile for our layers and the peers
- :mod:`.accuracy`      every method and seed on the synthetic set
- :mod:`.segmentation`  every method and seed on MoNuSeg's held-out hospitals

Importing this package has no side effects (no global warning filters, no patched modules).
"""
