"""ltx2_tools: what measures and exercises the product, apart from it: benchmarks against PEFT and
diffusers, the perf check and its plots, the fault matrix, the soak, the interrupt sweep, the hostile
inputs, and the scripted serving demo. Each module runs with ``python -m ltx2_tools.<module>``; the
``ltx2`` CLI's ``bench`` and ``perf-check`` commands are :mod:`ltx2_tools.bench` and
:mod:`ltx2_tools.perf`. They use ``ltx2_residency``'s public API and the ``ltx2_pipeline`` product."""

__all__: list[str] = []
