"""Benchmarks (``usae bench``); library code never imports this package.

- ``runner``: the explicit list of entries, the result rows and the table;
- ``timing``: the one timing helper (``seconds``), and the step-timing harness (ours against the reference);
- ``reference``: the authors' training step, re-typed from their code, as the timed reference;
- ``anatomy``: a training step cut into parts, with their FLOPs;
- one file per entry: ``step`` (training step), ``data`` (store and source rates), ``stats``, ``cam``.
"""
