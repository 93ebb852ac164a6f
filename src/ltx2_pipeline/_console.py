"""The console scripts ``ltx2`` and ``ltx2-demo``. The pipeline's dependencies are the
``pipeline`` extra; a core-only install gets a one-line error naming it instead of a traceback."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

#: Top-level modules the ``pipeline`` extra installs (transformers also comes with peft).
PIPELINE_MODULES = frozenset({"diffusers", "transformers", "rich", "av", "numpy"})
INSTALL_HINT = "pip install 'ltx2-residency[pipeline]'"
#: The exit status of a missing extra: the command could not run (2 is kept for bad arguments).
MISSING_EXTRA = 1


def _load(prog: str, module: str) -> Callable[..., int] | None:
    """``module``'s ``main``, or ``None`` after saying which extra to install."""
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in PIPELINE_MODULES:
            raise
        print(f"error: {prog}: {missing} is not installed; {prog} needs the pipeline extra: {INSTALL_HINT}",
              file=sys.stderr)
        return None


def ltx2(argv: Sequence[str] | None = None) -> int:
    main = _load("ltx2", "ltx2_pipeline.cli")
    return MISSING_EXTRA if main is None else main(argv)


def demo(argv: Sequence[str] | None = None) -> int:
    main = _load("ltx2-demo", "ltx2_tools.demo")  # the scripted serving loop is a tool
    return MISSING_EXTRA if main is None else main(argv)
