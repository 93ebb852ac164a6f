"""Per-request LoRA benchmark: requests that each choose their LoRAs among many registered ones,
against the same DiT calls on pre-merged weights and against diffusers' per-request
``load_lora_adapter`` + ``set_adapters``, side by side in one process.

    python -m ltx2_tools.bench_loras --shape tiny --device cpu --backend aot_eager --mode default --loras 6
    python -m ltx2_tools.bench_loras --shape real --json loras.json          # GPU, real LTX-2 shapes

The workload: ``--loras`` user LoRAs (ranks cycling over 16-128, attention layers, ‖ΔW‖ = 10 % of
‖W‖) registered with ``add_lora``, chosen with Zipf popularity, 0-2 per request plus the distilled
LoRA in stage 2; a host cache of ``--host-loras`` of them, so the popular ones stay and the tail
comes from disk. Two threads keep a queue of requests full, as a server does: each request is
admitted (its LoRAs start loading) while the one before it runs, and its time runs from the end of
the one before it to its own end. Each request is classed by where its LoRAs came from
(``device``: slots, ``host``: the host cache, ``disk``) and compared with the ideal: the same DiT
calls with the LoRAs already merged (a pre-merged DiT runs calls as fast as the base: the ideal is
timed once on the base).
Then, on a fresh eager DiT, the same requests (``--diffusers-requests``: the first N) through
diffusers (load each chosen LoRA from its file, ``set_adapters``, run, ``delete_adapters``), compared
with the same calls on that eager DiT's base weights. Ratios from this run only.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ltx2_residency import CompileSpec, LoRASpec, ManagerOptions, PhaseWork, ResidencyManager, compile_dit, testing

from .bench_compile import STAGE2_CALLS, Ctx, build, ideal

PROG = "python -m ltx2_tools.bench_loras"
RANKS = {"real": (16, 32, 64, 128), "tiny": (2, 4, 6, 8)}
SLOT_RANK = {"real": 128, "tiny": 8}


def write_loras(ctx: Ctx, shape: str, count: int, folder: Path) -> dict[str, str]:
    layers = [n for n in ctx.host if ".attn1." in n or ".attn2." in n]
    return {f"user{i}": testing.save_lora(folder / f"user{i}.safetensors", testing.synthetic_lora(
        ctx.model, layers, rank=RANKS[shape][i % len(RANKS[shape])], relative_norm=0.10, seed=100 + i))
        for i in range(count)}


def workload(names: list[str], requests: int, seed: int) -> list[dict[str, Any]]:
    """Each request's ``loras=``: 0-2 user LoRAs by Zipf popularity, at both stages, plus the distilled."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    out = []
    for _ in range(requests):
        k = rng.randint(0, min(2, len(names)))
        chosen: set[str] = set()
        while len(chosen) < k:
            chosen.add(rng.choices(names, weights=weights)[0])
        out.append({**{n: round(rng.uniform(0.5, 1.0), 3) for n in sorted(chosen)}, "distilled": {"stage2": 1.0}})
    return out


TIERS = ("device", "host", "disk")  # where a request's added LoRAs came from, best first
Mark = torch.cuda.Event | float


def mark(device: torch.device) -> Mark:
    """A point in the DiT's stream: an event where there is one (the GPU's clock), else the host's."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def ms_between(a: Mark, b: Mark) -> float:
    if isinstance(a, float) and isinstance(b, float):
        return (b - a) * 1e3
    assert isinstance(a, torch.cuda.Event) and isinstance(b, torch.cuda.Event)
    b.synchronize()
    return a.elapsed_time(b)


def one_request(mgr: ResidencyManager, ctx: Ctx, loras: dict[str, Any]) -> dict[str, Any]:
    """One request; its tier is the worst place one of its added LoRAs came from, and its end is
    marked in the DiT's stream while it still holds the DiT (so the marks are in request order)."""
    with mgr.request(loras=loras) as req:
        sources = req.lora_sources
        ctx.calls(req.enter("stage1", work=PhaseWork(steps=ctx.stage1_calls, tokens=ctx.tokens["stage1"])), "stage1")
        ctx.calls(req.enter("stage2", work=PhaseWork(steps=STAGE2_CALLS, tokens=ctx.tokens["stage2"])), "stage2")
        end = (next(_order), mark(ctx.device))
    tier = max(sources.values(), key=TIERS.index, default="device")
    return {"loras": loras, "sources": sources, "tier": tier, "end": end}


_order = itertools.count()


def queued_requests(mgr: ResidencyManager, ctx: Ctx, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs from a queue kept full by two threads, as a server runs them: each request is
    admitted (its LoRAs start loading) while the one before it runs. A request's time runs from the
    end of the one before it to its own end (its bind, its calls and the exit before it; the DiT
    never idles between requests). Each thread first runs one untimed request: CUDA graphs are
    recorded per thread."""
    queue = list(reversed(jobs))
    lock = threading.Lock()
    warm = threading.Barrier(2)
    done: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with torch.no_grad():
                one_request(mgr, ctx, jobs[0])
                warm.wait()
                while True:
                    with lock:
                        if not queue:
                            return
                        loras = queue.pop()
                    done.append(one_request(mgr, ctx, loras))
        except BaseException as exc:  # re-raised in the caller
            warm.abort()
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"bench-loras-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    done.sort(key=lambda r: r["end"][0])
    return [{**{k: v for k, v in run.items() if k != "end"}, "request_ms": ms_between(before["end"][1], run["end"][1])}
            for before, run in itertools.pairwise(done)]


def diffusers_request(ctx: Ctx, files: dict[str, str], loras: dict[str, Any]) -> float:
    """diffusers per request: each chosen LoRA read from its file into the DiT, weighted, run, deleted."""
    from safetensors.torch import load_file

    model = ctx.model
    users = [n for n in loras if n != "distilled"]
    t0 = ctx.now()
    for name in users:
        state = {k.removeprefix("transformer."): v for k, v in load_file(files[name]).items()}
        model.load_lora_adapter(state, adapter_name=name, prefix=None)
    names, weights = [*users, "distilled"], [float(loras[n]) for n in users]
    model.set_adapters(names, [*weights, 0.0])  # stage 1: the distilled LoRA off
    ctx.calls(model, "stage1")
    model.set_adapters(names, [*weights, 1.0])
    ctx.calls(model, "stage2")
    if users:
        model.delete_adapters(users)
    return (ctx.now() - t0) * 1e3


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "n": len(ordered)}


def release(ctx: Ctx, device: torch.device) -> None:
    """Let go of the compiled DiT and its graphs, so a second DiT fits on the device."""
    ctx.model = None  # type: ignore[assignment]
    torch._dynamo.reset()
    if device.type == "cuda":
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, device: torch.device, command: str,
        save: Callable[[dict[str, Any]], None] = lambda res: None) -> dict[str, Any]:
    """The manager on the compiled DiT, then (``save`` called between) diffusers on a fresh eager one."""
    ctx = build(args, device)
    ctx.requests = 2  # the ideal's repetitions
    folder = Path(tempfile.mkdtemp(prefix="ltx2_bench_loras_"))
    files = write_loras(ctx, args.shape, args.loras, folder)
    jobs = workload(list(files), args.requests, args.seed)
    one = max(Path(p).stat().st_size for p in files.values())
    res: dict[str, Any] = {"command": command, "torch": torch.__version__, "shape": args.shape,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "loras": args.loras, "requests": args.requests, "stage1_calls": args.stage1_calls,
                           "stage2_calls": STAGE2_CALLS, "host_loras": args.host_loras, "mode": args.mode}
    spec = None if args.mode == "eager" else CompileSpec(mode=args.mode, backend=args.backend)
    ctx.graphs = spec is not None and spec.cuda_graphs and device.type == "cuda"
    slot = SLOT_RANK[args.shape] * sum(sum(ctx.model.get_submodule(n).weight.shape)
                                       * ctx.model.get_submodule(n).weight.element_size() for n in ctx.host)
    distilled = LoRASpec("distilled", tensors=ctx.lora, strengths={"stage1": 0.0, "stage2": 1.0})
    options = ManagerOptions(lora_slot_rank=SLOT_RANK[args.shape], device_lora_cache_bytes=2 * slot,
                             host_lora_cache_bytes=args.host_loras * one, clean_source=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        if spec is not None:
            compile_dit(ctx.model, spec)
        s1, s2 = ideal(ctx)
        res["ideal_ms"] = statistics.median(s1) + statistics.median(s2)
        mgr = ResidencyManager(ctx.model, "original", [distilled], args.policy, options=options)
        try:
            for name, path in files.items():
                mgr.add_lora(LoRASpec(name, path=path))
            for loras in jobs[:2]:  # warm-up: the graphs
                one_request(mgr, ctx, loras)
            runs = queued_requests(mgr, ctx, jobs)
            res["cache"] = mgr.lora_cache_stats()
        finally:
            mgr.close()
        del mgr
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        res["device_cache_bytes"] = 2 * slot
        ideal_ms = res["ideal_ms"]
        res["tiers"] = {tier: {**percentiles([r["request_ms"] for r in runs if r["tier"] == tier]),
                               "overhead_p50": None} for tier in TIERS}
        for entry in res["tiers"].values():
            if entry["p50"] is not None:
                entry["overhead_p50"] = entry["p50"] / ideal_ms - 1
        res["runs"] = runs
        save(res)
        if args.diffusers and hasattr(ctx.model, "load_lora_adapter"):
            release(ctx, device)
            eager = build(args, device)  # a fresh, eager DiT: diffusers' adapters change its modules
            ctx.model, ctx.host, ctx.graphs = eager.model, eager.host, False
            del eager
            e1, e2 = ideal(ctx)  # diffusers is compared with the same calls on this eager DiT
            eager_ideal = statistics.median(e1) + statistics.median(e2)
            ctx.model.load_lora_adapter({k.removeprefix("transformer."): v for k, v in ctx.lora.items()},
                                        adapter_name="distilled", prefix=None)  # kept, as a server keeps it
            d = [diffusers_request(ctx, files, loras) for loras in jobs[:args.diffusers_requests]]
            res["diffusers"] = {**percentiles(d), "ideal_ms": eager_ideal,
                                "overhead_p50": statistics.median(d) / eager_ideal - 1}
    return res


def table(res: dict[str, Any]) -> str:
    lines = [f"{res['device']}, torch {res['torch']}, DiT {res['mode']}: `{res['command']}`", "",
             "| LoRAs from | requests | p50 ms | p99 ms | ideal ms | overhead (p50) |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = dict(res["tiers"])
    if "diffusers" in res:
        rows["diffusers, eager DiT"] = res["diffusers"]
    for name, t in rows.items():
        if t["p50"] is not None:
            lines.append(f"| {name} | {t['n']} | {t['p50']:.1f} | {t['p99']:.1f} | "
                         f"{t.get('ideal_ms', res['ideal_ms']):.1f} | {t['overhead_p50']:+.2%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ltx2_pipeline.checks import positive_int
    from ltx2_pipeline.errors import GenerationInputError

    from .bench_compile import check_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("real", "tiny"), default="real")
    ap.add_argument("--device", default=None)
    ap.add_argument("--mode", default="reduce-overhead", help="compile mode of the DiT ('eager': not compiled)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--policy", default="auto", choices=("auto", "merge", "dynamic", "sglang"))
    ap.add_argument("--loras", type=positive_int, default=50, help="user LoRAs registered")
    ap.add_argument("--host-loras", type=positive_int, default=10, help="the host cache's size, in LoRAs")
    ap.add_argument("--requests", type=positive_int, default=40)
    ap.add_argument("--stage1-calls", type=positive_int, default=60, help="30 steps x 2 (CFG) by default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    ap.add_argument("--diffusers-requests", type=positive_int, default=None,
                    help="diffusers runs the first N of the requests (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from ltx2_pipeline.checks import device as parse_device

    args.device = parse_device(args.device) if args.device else None
    args.modes, args.policies = [args.mode], [args.policy]
    try:
        device = check_arguments(args)
    except GenerationInputError as exc:
        print(f"error: {PROG}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    def save(res: dict[str, Any]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(table(res), flush=True)

    save(run(args, device, " ".join([PROG, *map(shlex.quote, argv)]), save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
