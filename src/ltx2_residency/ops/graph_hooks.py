"""Module hooks that work the same on an eager and on a compiled DiT.

The manager's hooks (the forward guard, a merge ahead) read locks and Python state that a graph
cannot hold. A hook on a compiled module itself runs outside its graph when it is marked so
(:func:`outside_graphs`); a hook on a module inside a compiled region is traced into the graph,
where calling Python is a graph break (an error under ``fullgraph``), so there it does nothing
(:func:`eager_only`) and the hook on the DiT itself does the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def outside_graphs(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run by Python even when its module is compiled: for the DiT's own hooks (the root
    compiled whole, or the eager root of a regionally compiled DiT), with no graph break."""
    return torch.compiler.disable(hook)


def eager_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` where its module runs eagerly; nothing where it is traced into a graph (a block
    of a compiled DiT)."""
    def run(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return None
        return hook(*args)
    return run
