"""The pipeline's DiT under ``torch.compile``: the ``compile=`` value checked, what a request
compiled (for its report), the per-call hooks CUDA graphs need, and the CLI's ``--compile`` flags.

The DiT itself is compiled by the manager (:meth:`~ltx2_residency.ResidencyManager.compile`), in
place and regionally by default; see ``docs/compile.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ltx2_residency import COMPILE_MODES, CompileSpec, OptionError, compiled_graphs

from .errors import GenerationInputError


def check_compile(value: object) -> CompileSpec | None:
    """The :class:`~ltx2_residency.CompileSpec` a pipeline's ``compile=`` value stands for (``None``:
    eager), or :class:`~ltx2_residency.OptionError` for a value no spec stands for or a backend this
    torch does not have (``torch.compile`` would refuse it only once the DiT is built)."""
    spec = CompileSpec.of(value)
    if spec is not None:
        spec.require_backend()
    return spec


# ---------------------------------------------------------------------- what a request compiled
def _compile_seconds() -> float:
    """Seconds Dynamo has spent compiling frames in this process so far (0 where torch does not say)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
        return float(calculate_time_spent().get("entire_frame_compile", 0.0))
    except (ImportError, AttributeError):  # a private API: a torch without it reports no compile time
        return 0.0


def compile_counts() -> tuple[int, float]:
    """Dynamo's process-wide counts now (graphs, seconds compiling): take them at a request's start."""
    return compiled_graphs(), _compile_seconds()


def compile_report(spec: CompileSpec | None, start: tuple[int, float]) -> dict[str, Any]:
    """A request's report fields: ``compile`` (the spec, ``None`` when eager), ``graphs_compiled``
    (the graphs compiled since ``start``: 0 once the DiT is warm at the request's shapes and phase
    kinds) and ``compile_ms`` (the time that took, part of the request's ``e2e_ms``)."""
    graphs, seconds = compile_counts()
    return {"compile": None if spec is None else {"mode": spec.mode, "backend": spec.backend,
                                                   "regional": spec.regional},
            "graphs_compiled": graphs - start[0], "compile_ms": (seconds - start[1]) * 1e3}


# ---------------------------------------------------------------------- CUDA graphs
def cuda_graph_hooks(dit: nn.Module, spec: CompileSpec | None, device: torch.device) -> list[Any]:
    """Hooks on ``dit`` for a stage run under CUDA graphs (``reduce-overhead``/``max-autotune`` on a
    GPU), to remove when the stage is done; none otherwise."""
    if spec is None or not spec.cuda_graphs or device.type != "cuda":
        return []

    # A replayed CUDA graph writes its outputs into the same static buffers each time, and
    # LTX2Pipeline calls the DiT several times a step (the CFG batch, the STG and modality passes)
    # before it combines their outputs: each call starts a new CUDA-graph step and copies its
    # outputs out, so the next call's replay cannot overwrite what this one returned.
    @torch.compiler.disable
    def begin(_module: nn.Module, _args: Any) -> None:
        torch.compiler.cudagraph_mark_step_begin()

    @torch.compiler.disable
    def keep(_module: nn.Module, _args: Any, output: Any) -> Any:
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, output)

    return [dit.register_forward_pre_hook(begin), dit.register_forward_hook(keep)]


# ---------------------------------------------------------------------- the CLI's flags
def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--compile [MODE]`` and ``--compile-backend NAME``, as ``generate`` and ``bench`` take them."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE",
                        help="compile the DiT with torch.compile (regionally: one graph serves every block); MODE is "
                        f"inductor's, one of {', '.join(COMPILE_MODES)} (default: default). The first request at "
                        "each shape pays the compilation; reduce-overhead and max-autotune capture CUDA graphs on a "
                        "GPU")
    parser.add_argument("--compile-backend", default=None, metavar="NAME",
                        help="with --compile: the torch.compile backend (default inductor; e.g. aot_eager, which "
                        "needs no C++ compiler, with --compile default)")


def compile_arguments(args: argparse.Namespace) -> CompileSpec | None:
    """The spec ``--compile``/``--compile-backend`` ask for (``None``: eager), or
    :class:`GenerationInputError` naming the flags."""
    backend = args.compile_backend
    if args.compile is None:
        if backend is not None:
            raise GenerationInputError(f"--compile-backend {backend} applies with --compile only (it names what "
                                       "compiles the DiT); add --compile, or drop it")
        return None
    backend = "inductor" if backend is None else backend
    try:
        return check_compile(CompileSpec(mode=args.compile, backend=backend))
    except OptionError as exc:
        if backend != "inductor" and args.compile != "default":
            raise GenerationInputError(f"--compile {args.compile} is a mode of the inductor backend, and "
                                       f"--compile-backend {backend} takes --compile default (or --compile "
                                       "alone); drop one of them") from None
        raise GenerationInputError(f"--compile-backend {backend!r}: {exc}") from None
