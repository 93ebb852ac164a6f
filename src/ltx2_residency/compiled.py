"""A DiT under ``torch.compile``: how to compile the DiTs a manager runs, and how to tell one is.

Compiled the diffusers way, in place: regionally (each numbered block compiled on its own, as
``compile_repeated_blocks`` does: one graph serves every block, so compiling costs one block's
time) or whole (``module.compile()``). In place means the module stays the module the manager
holds and hooks; ``torch.compile(module)`` returns a wrapper instead, which the manager refuses
(:class:`~ltx2_residency.errors.CompiledModuleError`).

The manager is compile-ready in either order: its guard runs outside the graphs, a merge writes
the weights in place (a captured CUDA graph reads the new bits), and the dynamic path reads
fixed-shape adapter tensors and strengths held as tensors (``ops.forward``), so the number of
graphs is bounded by the phase kinds (base or merged, and dynamic), never by strengths, mixes or
requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import CompiledModuleError, OptionError
from .ops.ahead import blocks_of

#: inductor's modes; the last two capture CUDA graphs (on a GPU)
MODES = COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class CompileSpec:
    """How the DiTs are compiled: ``torch.compile``'s own arguments, and ``regional`` (each numbered
    block on its own, the default: diffusers' regional compilation) or the whole model."""

    mode: str = "default"
    backend: str = "inductor"
    regional: bool = True
    fullgraph: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"CompileSpec.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise OptionError(f"CompileSpec.backend must be a backend name (e.g. 'inductor'), got {self.backend!r}")
        if self.backend != "inductor" and self.mode != "default":
            raise OptionError(f"CompileSpec.mode {self.mode!r} is inductor's; backend {self.backend!r} takes "
                              "mode='default'")
        for name in ("regional", "fullgraph", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"CompileSpec.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value: object) -> CompileSpec | None:
        """A spec from what a caller may pass as ``compile=``: ``None``/``False`` (eager), ``True``
        (the defaults), a mode name, or a spec."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, str):
            return cls(mode=value.strip().lower())
        if isinstance(value, cls):
            return value
        raise OptionError(f"compile must be None, a bool, a mode name ({', '.join(MODES)}) or a CompileSpec, "
                          f"got {value!r}")

    def require_backend(self) -> None:
        """:class:`OptionError` unless this torch has the backend (``torch.compile`` itself would
        refuse it only when the first module is compiled)."""
        known = torch.compiler.list_backends(exclude_tags=())
        if self.backend not in known:
            raise OptionError(f"compile backend {self.backend!r} is not one this torch has; use one of "
                              f"{', '.join(torch.compiler.list_backends())} (or a debugging backend such as "
                              "aot_eager or eager; torch.compiler.list_backends(exclude_tags=()) lists them all)")

    @property
    def cuda_graphs(self) -> bool:
        """Whether this mode captures CUDA graphs (on a GPU)."""
        return self.backend == "cudagraphs" or (self.backend == "inductor" and self.mode in CUDA_GRAPH_MODES)

    def kwargs(self) -> dict[str, object]:
        """``torch.compile``'s keyword arguments."""
        out = {k: v for k, v in asdict(self).items() if k != "regional"}
        if self.backend != "inductor":
            out.pop("mode")
        return out


def compile_dit(module: nn.Module, spec: CompileSpec | None = None) -> nn.Module:
    """Compile ``module`` in place as ``spec`` says and return it (the same module). The spec is
    recorded on the module, so a copy the manager makes of it (resident and snapshot modes) is
    compiled the same way."""
    spec = spec if spec is not None else CompileSpec()
    refuse_wrapper(module)
    spec.require_backend()
    targets = blocks_of(module) if spec.regional else [module]
    if not targets:
        raise OptionError(f"regional compilation needs numbered blocks (e.g. transformer_blocks.0) and "
                          f"{type(module).__name__} has none; use CompileSpec(regional=False)")
    for target in targets:
        target.compile(**spec.kwargs())  # type: ignore[arg-type]
    module._ltx2_compile_spec = spec  # type: ignore[assignment]
    return module


def spec_of(module: nn.Module) -> CompileSpec | None:
    """The spec :func:`compile_dit` compiled ``module`` with (``None``: not by it)."""
    spec = getattr(module, "_ltx2_compile_spec", None)
    return spec if isinstance(spec, CompileSpec) else None


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it was compiled in place (``.compile()``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def refuse_wrapper(module: object) -> None:
    """Refuse ``torch.compile(module)``'s wrapper: the manager needs the module it returns."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        raise CompiledModuleError(
            "got the wrapper torch.compile(transformer) returns; build the manager on the transformer itself "
            "and compile it in place, before or after: transformer.compile(...), "
            "transformer.compile_repeated_blocks(...), ltx2_residency.compile_dit(transformer, CompileSpec(...)) "
            "or manager.compile(CompileSpec(...))")


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (count before and after to see new ones)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def no_recompiles() -> Iterator[None]:
    """Inside, a recompilation raises (``torch._dynamo.config.error_on_recompile``) instead of
    compiling a new graph or, past the recompile limit, silently running eager."""
    config = torch._dynamo.config
    before = config.error_on_recompile
    config.error_on_recompile = True
    try:
        yield
    finally:
        config.error_on_recompile = before
