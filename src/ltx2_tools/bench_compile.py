"""Compiled-DiT benchmark: the DiT eager and under torch.compile modes, and the residency manager
driving the compiled DiT against the compiled ideal, side by side in one process.

    python -m ltx2_tools.bench_compile --shape tiny --device cpu --backend aot_eager   # CPU smoke test
    python -m ltx2_tools.bench_compile --shape real --json out.json                     # GPU, real LTX-2 shapes

Per compile mode ("eager": not compiled, run first), on one DiT, Dynamo reset between modes:
1. one DiT call at each stage's video tokens: first call (compilation), wall (median of 5) against
   its kernels' time (profiler), graphs compiled, peak memory;
2. the ideal request, no manager: stage 1 on base weights, stage 2 on weights merged in place here;
3. the manager: a warm-up request per policy, then rounds of one request per policy with new
   strengths under ``no_recompiles()``: graphs compiled after the warm-up (a recompile is a failure
   entry), managed weights against clean after each request, ``overhead = request / ideal - 1``.
Ratios measured in this run, never a timed assertion; absolute times belong to the card.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ltx2_residency import (
    CompileSpec,
    DirtyWeightsError,
    Fingerprint,
    LoRASpec,
    ManagerOptions,
    OptionError,
    PhaseWork,
    ResidencyManager,
    compile_dit,
    compiled_graphs,
    no_recompiles,
    testing,
)

from .bench_switch import AUDIO_FRAMES, STEP_TOKENS, TEXT_TOKENS

DESCRIPTION = __doc__.split("\n\n")[0]
PROG = "python -m ltx2_tools.bench_compile"
DEFAULT_MODES = ("eager", "default", "reduce-overhead")
POLICIES = ("merge", "dynamic", "auto", "sglang")
PRESET = {"real": "full", "tiny": "tiny"}  # bench_switch's names of the two shapes
RANK = {"real": 384, "tiny": 8}
STAGE2_CALLS = 3  # the distilled stage 2's steps
WALL_REPS = 5
GIB = 2**30


@dataclass
class Ctx:
    """One run's DiT, its LoRA and a copy of the weights it targets (host), each stage's inputs."""

    model: nn.Module
    lora: dict[str, torch.Tensor]
    host: dict[str, torch.Tensor]
    device: torch.device
    inputs: dict[str, dict[str, Any]]  # stage -> DiT kwargs
    tokens: dict[str, int]
    stage1_calls: int
    requests: int
    graphs: bool = False  # the mode captures CUDA graphs: mark each step, clone outputs

    def call(self, dit: nn.Module, stage: str) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return dit(**self.inputs[stage])[0].clone()
        return dit(**self.inputs[stage])[0]

    def calls(self, dit: nn.Module, stage: str) -> None:
        for _ in range(self.stage1_calls if stage == "stage1" else STAGE2_CALLS):
            self.call(dit, stage)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def ms(self, fn: Callable[[], object]) -> float:
        start = self.now()
        fn()
        return (self.now() - start) * 1e3

    def kernel_ms(self, fn: Callable[[], object]) -> float:
        cuda = self.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            fn()
            self.now()
        return sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.key_averages()) / 1e3

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.device.type == "cuda" else None

    def free_memory(self) -> None:
        torch._dynamo.reset()  # also frees CUDA graph trees
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def call_costs(ctx: Ctx) -> dict[str, Any]:
    """Step 1: one DiT call at each stage's tokens."""
    out: dict[str, Any] = {}
    for stage in ctx.inputs:
        def once(s: str = stage) -> object:
            return ctx.call(ctx.model, s)
        before = compiled_graphs()
        first = ctx.ms(once) / 1e3
        once(), once()  # CUDA graphs are recorded on a later call than the first
        runs = [ctx.ms(once) for _ in range(WALL_REPS)]
        kernels, wall = ctx.kernel_ms(once), statistics.median(runs)
        out[stage] = {"video_tokens": ctx.tokens[stage], "first_call_s": first, "wall_ms": wall,
                      "kernel_ms": kernels, "wall_over_kernels": wall / kernels if kernels > 0 else None,
                      "graphs": compiled_graphs() - before, "runs_ms": [round(r, 3) for r in runs]}
    return out


def merge_in_place(ctx: Ctx, strength: float) -> None:
    """W += strength * B @ A in fp32, rounded once to the weight's dtype (the ideal's weights)."""
    for name in ctx.host:
        w = ctx.model.get_submodule(name).weight
        a = ctx.lora[f"transformer.{name}.lora_A.weight"].to(w.device, torch.float32)
        b = ctx.lora[f"transformer.{name}.lora_B.weight"].to(w.device, torch.float32)
        w.copy_(w.float().addmm_(b, a, alpha=strength).to(w.dtype))


def ideal(ctx: Ctx, strength: float = 0.9) -> tuple[list[float], list[float]]:
    """Step 2: the request's calls with no manager: stage 1 on base, stage 2 on merged weights."""
    ctx.call(ctx.model, "stage1")  # untimed: back on this DiT after the manager's graphs
    stage1 = [ctx.ms(lambda: ctx.calls(ctx.model, "stage1")) for _ in range(ctx.requests)]
    merge_in_place(ctx, strength)
    try:
        ctx.call(ctx.model, "stage2")
        stage2 = [ctx.ms(lambda: ctx.calls(ctx.model, "stage2")) for _ in range(ctx.requests)]
    finally:  # bit for bit from the host copy
        for name, clean in ctx.host.items():
            ctx.model.get_submodule(name).weight.copy_(clean)
    return stage1, stage2


def one_request(mgr: ResidencyManager, ctx: Ctx, strength: float) -> dict[str, Any]:
    """A request: stage-1 calls on base weights, the switch, stage-2 calls at ``strength``."""
    seen, t = mgr.trace.total, [ctx.now()]
    with mgr.request() as req:
        dit = req.enter("stage1", work=PhaseWork(steps=ctx.stage1_calls, tokens=ctx.tokens["stage1"]))
        ctx.calls(dit, "stage1")
        t.append(ctx.now())
        dit = req.enter("stage2", strengths={"distilled": strength},
                        work=PhaseWork(steps=STAGE2_CALLS, tokens=ctx.tokens["stage2"]))
        t.append(ctx.now())
        ctx.calls(dit, "stage2")
        t.append(ctx.now())
    t.append(ctx.now())  # the undo, on a side stream or not, is the request's
    new = mgr.trace.total - seen
    ms = [(b - a) * 1e3 for a, b in itertools.pairwise(t)]
    return {"strength": strength, "request_ms": sum(ms), "stage1_ms": ms[0], "switch_ms": ms[1],
            "stage2_ms": ms[2], "exit_ms": ms[3],
            "events": [(r.event, round(r.duration_ms, 2)) for r in list(mgr.trace)[-new:]] if new else []}


def dirty_count(mgr: ResidencyManager, clean: Fingerprint) -> int:
    """Managed weights whose bits differ from clean (fingerprints), and the manager's own check."""
    mgr.synchronize()
    dirty = len(clean.differing(Fingerprint.of(mgr.managed_weights.items())))
    try:
        mgr.verify_clean()
    except DirtyWeightsError:
        dirty = max(dirty, 1)
    return dirty


def failure(where: str, exc: BaseException) -> dict[str, str]:
    kind = "recompile" if isinstance(exc, torch._dynamo.exc.RecompileError) else "error"
    return {"where": where, "kind": kind, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def managed(ctx: Ctx, policies: Sequence[str]) -> dict[str, Any]:
    """Step 3: the manager driving the DiT, every policy warmed up, then interleaved requests."""
    spec = LoRASpec("distilled", tensors=ctx.lora, strengths={"stage1": 0.0, "stage2": 1.0})
    mgr = ResidencyManager(ctx.model, "original", [spec], policies[0], options=ManagerOptions(clean_source=None))
    recs: dict[str, dict[str, Any]] = {p: {"runs": [], "failures": [], "dirty": 0, "graphs_after_warmup": 0}
                                       for p in policies}
    try:
        clean, start = Fingerprint.of(mgr.managed_weights.items()), compiled_graphs()
        for p in policies:
            mgr.set_merge_policy(p)
            try:
                recs[p]["warmup"] = one_request(mgr, ctx, 1.0)
            except Exception as exc:  # reported, the other policies still run
                recs[p]["failures"].append(failure("warm-up", exc))
            recs[p]["dirty"] = dirty_count(mgr, clean)
        warm, strength = compiled_graphs(), 1.0
        with no_recompiles():
            for i in range(ctx.requests):
                for p in policies:  # interleaved: a drift of the machine spreads over every policy
                    strength *= 0.9  # a new strength every request
                    mgr.set_merge_policy(p)
                    before = compiled_graphs()
                    try:
                        recs[p]["runs"].append(one_request(mgr, ctx, round(strength, 6)))
                    except Exception as exc:
                        recs[p]["failures"].append(failure(f"request {i}", exc))
                    recs[p]["graphs_after_warmup"] += compiled_graphs() - before
                    recs[p]["dirty"] = max(recs[p]["dirty"], dirty_count(mgr, clean))
        return {"warmup_graphs": warm - start, "graphs_after_warmup": compiled_graphs() - warm, "policies": recs}
    finally:
        mgr.close()


def run_mode(res: dict[str, Any], ctx: Ctx, mode: str, backend: str, policies: Sequence[str]) -> None:
    """One compile mode's three steps, filling ``res`` as they go (a failure keeps what was measured)."""
    spec = None if mode == "eager" else CompileSpec(mode=mode, backend=backend)
    res["spec"] = asdict(spec) if spec else None
    ctx.graphs = spec is not None and spec.cuda_graphs and ctx.device.type == "cuda"
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    if spec is not None:
        compile_dit(ctx.model, spec)
    res["calls"] = call_costs(ctx)
    res["peak_calls_gib"] = ctx.peak_gib()
    before = ideal(ctx)
    res["managed"] = managed(ctx, policies)
    after = ideal(ctx)  # on the DiT given back: a drift of the machine shows as before != after
    s1, s2 = statistics.median(before[0] + after[0]), statistics.median(before[1] + after[1])
    res["ideal"] = {"stage1_ms": s1, "stage2_ms": s2, "request_ms": s1 + s2,
                    "before_ms": sum(map(statistics.median, before)), "after_ms": sum(map(statistics.median, after))}
    for rec in res["managed"]["policies"].values():
        if rec["runs"]:
            for key in ("request_ms", "switch_ms", "exit_ms"):
                rec[key] = statistics.median(r[key] for r in rec["runs"])
            rec["overhead"] = rec["request_ms"] / (s1 + s2) - 1
    res["dirty_vs_host_copy"] = sum(not torch.equal(ctx.model.get_submodule(n).weight.cpu(), clean)
                                    for n, clean in ctx.host.items())
    res["peak_gib"] = ctx.peak_gib()


def build(args: argparse.Namespace, device: torch.device) -> Ctx:
    """The DiT, its LoRA on every block linear and a copy of their weights (host), the inputs."""
    from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer

    if args.shape == "real":
        from .realshape import real_shape_transformer
        model: nn.Module = real_shape_transformer(device)
    else:
        model = tiny_transformer().to(device)
    targets = testing.linear_names(model)
    lora = {k: v.cpu() for k, v in testing.synthetic_lora(model, targets, rank=RANK[args.shape]).items()}
    host = {n: model.get_submodule(n).weight.detach().cpu().clone() for n in targets}
    preset, inputs = PRESET[args.shape], {}
    for i, (stage, (f, h, w)) in enumerate(STEP_TOKENS[preset].items()):
        kw = tiny_inputs(model, seed=i, frames=f, height=h, width=w, text_tokens=TEXT_TOKENS[preset],
                         audio_frames=AUDIO_FRAMES[preset])
        inputs[stage] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    tokens = {s: f * h * w for s, (f, h, w) in STEP_TOKENS[preset].items()}
    return Ctx(model, lora, host, device, inputs, tokens, args.stage1_calls, args.requests)


def run(args: argparse.Namespace, device: torch.device, command: str) -> dict[str, Any]:
    preset = PRESET[args.shape]
    res: dict[str, Any] = {
        "command": command, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": args.shape, "backend": args.backend, "policies": args.policies,
        "requests": args.requests, "stage1_calls": args.stage1_calls, "stage2_calls": STAGE2_CALLS,
        "text_tokens": TEXT_TOKENS[preset], "audio_frames": AUDIO_FRAMES[preset], "lora_rank": RANK[args.shape],
        "kernel_clock": "cuda self device time" if device.type == "cuda" else "cpu self time of ops"}
    ctx = build(args, device)
    res.update(lora_layers=len(ctx.host), video_tokens=ctx.tokens, modes={})
    for mode in sorted(args.modes, key=lambda m: m != "eager"):  # eager first: before anything is compiled
        ctx.free_memory()
        entry = res["modes"][mode] = {}
        gc.disable()  # no collector pauses inside the timings
        try:
            with torch.no_grad():
                run_mode(entry, ctx, mode, args.backend, args.policies)
        except Exception as exc:  # one mode failing (out of memory, a backend error) loses no other
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            gc.enable()
        print(f"{mode}: {entry.get('error', 'done')}", file=sys.stderr, flush=True)
        if args.json:  # after each mode: what a run cut short had measured is kept
            Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    ctx.free_memory()
    return res


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def table(res: dict[str, Any]) -> str:
    """The results as markdown tables under the card, torch and the command line that made them."""
    lines = [f"{res['device']}, torch {res['torch']}: `{res['command']}`", "",
             "| mode | video tokens | first call s | wall ms | kernels ms | wall/kernels | vs eager | graphs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    eager = res["modes"].get("eager", {}).get("calls", {})
    for mode, m in res["modes"].items():
        for stage, c in m.get("calls", {}).items():
            base = eager.get(stage, {}).get("wall_ms")
            lines.append(f"| {mode} | {c['video_tokens']} | {_f(c['first_call_s'], '.2f')} | {_f(c['wall_ms'])} | "
                         f"{_f(c['kernel_ms'])} | {_f(c['wall_over_kernels'], '.2f')} | "
                         f"{_f(c['wall_ms'] / base if base else None, '.2f')} | {c['graphs']} |")
    lines += ["", "| mode | policy | request ms | ideal ms | overhead | switch ms | exit ms | graphs after warm-up "
              "| dirty | failures | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    failed = [f"{mode} failed: {m['error']}" for mode, m in res["modes"].items() if "error" in m]
    for mode, m in res["modes"].items():
        for policy, p in m.get("managed", {}).get("policies", {}).items():
            lines.append(f"| {mode} | {policy} | {_f(p.get('request_ms'))} | {_f(m['ideal']['request_ms'])} | "
                         f"{_f(p.get('overhead'), '+.1%')} | {_f(p.get('switch_ms'))} | {_f(p.get('exit_ms'))} | "
                         f"{p['graphs_after_warmup']} | {p['dirty']} | {len(p['failures'])} | {_f(m['peak_gib'])} |")
            failed += [f"{mode}/{policy} {f['where']}: {f['kind']}: {f['error'][:200]}" for f in p["failures"]]
    return "\n".join([*lines, "", *failed] if failed else lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from ltx2_pipeline.checks import device, positive_int

    ap.add_argument("--shape", choices=("real", "tiny"), default="real",
                    help="real: diffusers' default LTX-2 DiT config, random bf16 weights (GPU); tiny: CPU ok")
    ap.add_argument("--device", type=device, default=None, help="default: cuda when there is one, else cpu")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="compile modes ('eager': not compiled)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager on a CPU)")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--requests", type=positive_int, default=3, help="timed requests per policy after warm-up")
    ap.add_argument("--stage1-calls", type=positive_int, default=8, help="DiT calls in a request's stage 1")
    ap.add_argument("--json", default=None, help="write the results here (in an existing directory)")


def check_arguments(args: argparse.Namespace) -> torch.device:
    """Every argument checked before anything is built (a GenerationInputError: exit 2)."""
    from ltx2_pipeline.checks import check_device, check_fits, check_output_path
    from ltx2_pipeline.errors import GenerationInputError

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    if args.shape == "real" and device.type != "cuda":
        raise GenerationInputError(f"--shape real runs on a CUDA device, not {device}; use --shape tiny "
                                   "(e.g. --shape tiny --device cpu --backend aot_eager)")
    for flag, values in (("--modes", args.modes), ("--policies", args.policies)):
        if len(set(values)) != len(values):
            raise GenerationInputError(f"{flag} names one twice: {' '.join(values)}")
    if args.backend not in torch.compiler.list_backends(exclude_tags=()):
        raise GenerationInputError(f"--backend {args.backend!r} is not a torch.compile backend; use inductor "
                                   "(GPU) or aot_eager (CPU)")
    for mode in (m for m in args.modes if m != "eager"):
        try:
            CompileSpec(mode=mode, backend=args.backend)
        except OptionError as exc:
            raise GenerationInputError(f"--modes {mode}: {exc} ('eager': not compiled)") from None
    if args.json is not None:
        check_output_path("--json", Path(args.json))
    if args.shape == "real":
        from ltx2_pipeline.presets import full_preset_bytes

        held = full_preset_bytes(lora_rank=RANK["real"])
        check_fits(f"{PROG} --shape real", held["transformer"] + held["distilled_lora"], device,
                   f"the DiT {held['transformer'] / GIB:.1f} GiB + the LoRA {held['distilled_lora'] / GIB:.1f} GiB",
                   "run it on a GPU with the memory")
    return device


def command(args: argparse.Namespace, console: object = None, line: str = PROG) -> int:
    """Run and report (``ltx2``'s tool-command signature); ``line``: the command line, for the report."""
    res = run(args, check_arguments(args), line)
    print(json.dumps(res, indent=1, default=str))
    print(table(res))  # last: what a log's tail shows
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the benchmark ran (what failed is in its report), 2 on bad arguments."""
    from ltx2_pipeline.errors import GenerationInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return command(args, line=" ".join([PROG, *map(shlex.quote, argv)]))
    except GenerationInputError as exc:
        print(f"error: {PROG}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
