"""Phase-switch benchmark: our exact merge/restore against PEFT's merge/unmerge, one model,
one process, side by side; plus drift after repeated cycles and the fingerprint cost.

    python -m ltx2_tools.bench_switch --preset tiny            # CPU, seconds
    python -m ltx2_tools.bench_switch --preset full --json o.json   # GPU, real LTX-2 shapes

Prints ratios (ours / PEFT); absolute times belong to the card they came from.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer

from ltx2_residency import Fingerprint, LoRASpec, ManagerOptions, ResidencyManager, testing

PRESETS = {
    "tiny": dict(rank=8),
    "full": dict(rank=384),
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - start) * 1e3


#: Video tokens of LTX-2's two stages at 768x512x121 (latent 16 frames x 16 x 24; stage 1 at half size).
STEP_TOKENS = {"full": {"stage1": (16, 8, 12), "stage2": (16, 16, 24)},
               "tiny": {"stage1": (2, 4, 4), "stage2": (2, 8, 8)}}
TEXT_TOKENS = {"full": 1024, "tiny": 8}  # the pipeline pads prompts to max_sequence_length
AUDIO_FRAMES = {"full": 126, "tiny": 4}


def run(preset: str, relative_norm: float, requests: int, exact_kernel: str, device: str,
        tile_configs: list[str] | None = None, steps: bool = True) -> dict:
    if preset == "full":
        from .realshape import real_shape_transformer
        model = real_shape_transformer(device)
    else:
        from ltx2_pipeline.tiny import tiny_transformer
        model = tiny_transformer().to(device)
    targets = testing.linear_names(model)
    tensors = testing.synthetic_lora(model, targets, rank=PRESETS[preset]["rank"], relative_norm=relative_norm)
    res: dict = {
        "preset": preset, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, "lora_layers": len(targets), "rank": PRESETS[preset]["rank"],
        "relative_norm": relative_norm, "exact_kernel": exact_kernel,
    }
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", tensors=tensors,
                                                  strengths={"stage1": 0.0, "stage2": 1.0})],
                           merge_policy="merge", options=ManagerOptions(exact_kernel=exact_kernel, strict=False,
                                                                       verify="never", clean_source=None))
    del tensors
    res["exact_kernel"] = mgr.exact_kernel
    res["overlap_restore"] = mgr.overlap_restore
    mem = mgr.memory()
    res["adapted_weight_gib"] = mem["managed_weight_bytes"] / 2**30
    res["lora_gib"] = mem["lora_adapter_bytes"] / 2**30
    weights = mgr.managed_weights

    def cycle() -> tuple[float, float, float, int, float]:
        with mgr.request() as req:
            req.enter("stage1")
            merge = _timed(lambda: req.enter("stage2"))
            held = mgr.memory()["restore_capture_bytes"]
            fraction = mgr.memory()["last_merge_exception_fraction"]
            _sync()
            start = time.perf_counter()
        # the request's critical path ends when the `with` returns; the undo may still be running
        # (on the manager's side stream when overlapped: the next request's work waits for it)
        host = (time.perf_counter() - start) * 1e3
        mgr.synchronize()
        _sync()
        total = (time.perf_counter() - start) * 1e3
        mgr.verify_clean()
        return merge, host, total, held, fraction

    if tile_configs and mgr.exact_kernel == "fused":
        res["tiles"] = {}
        for cfg in tile_configs:
            os.environ["LTX2_FUSED_TILES"] = cfg
            runs = [cycle() for _ in range(requests)]
            res["tiles"][cfg] = {"merge_ms": statistics.median(r[0] for r in runs),
                                 "restore_ms": statistics.median(r[2] for r in runs)}
        best = min(res["tiles"], key=lambda c: res["tiles"][c]["merge_ms"] + res["tiles"][c]["restore_ms"])
        os.environ["LTX2_FUSED_TILES"] = best
        res["tiles_best"] = best
    runs = [cycle() for _ in range(requests)]
    merge_ms, restore_host_ms, restore_ms = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    capture, frac = [r[3] for r in runs], [r[4] for r in runs]
    res["ours_requests_verified_clean"] = requests
    res["ours_merge_ms"] = statistics.median(merge_ms)
    res["ours_restore_ms"] = statistics.median(restore_ms)
    res["ours_restore_host_ms"] = statistics.median(restore_host_ms)
    res["ours_capture_gib"] = max(capture) / 2**30
    res["ours_capture_fraction_of_copy"] = max(capture) / mem["managed_weight_bytes"]
    res["ours_exception_fraction"] = max(frac)
    if steps:
        res["steps"] = step_overhead(mgr, model, preset, device)
        res["ahead"] = merge_ahead_cost(mgr, model, preset, device)
    mgr.verify_clean()  # what a server calls between requests: the manager's cached fingerprint plan
    res["fingerprint_ms"] = statistics.median(_timed(mgr.verify_clean) for _ in range(5))
    res["fingerprint_adhoc_ms"] = statistics.median(
        _timed(lambda: Fingerprint.of(weights.items())) for _ in range(3))
    res["fingerprint_torch_ms"] = statistics.median(
        _timed(lambda: Fingerprint.of(weights.items(), use_kernel=False)) for _ in range(2))

    def floor() -> None:  # one read and one write of every adapted weight, nothing computed
        with torch.no_grad():
            for w in weights.values():
                w.mul_(1)
    floor()
    res["floor_rw_ms"] = statistics.median(_timed(floor) for _ in range(3))
    clean = Fingerprint.of(weights.items())

    # PEFT's own merge/unmerge on the very same adapters (the manager's are PEFT LoraLayers)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(True)
        m.set_adapter(["distilled"], inference_mode=True)

    def peft_merge() -> None:
        for m in layers:
            m.merge(adapter_names=["distilled"])

    def peft_unmerge() -> None:
        for m in layers:
            m.unmerge()

    pm, pu = [], []
    with torch.no_grad():
        for _ in range(4):
            pm.append(_timed(peft_merge))
            pu.append(_timed(peft_unmerge))
    res["peft_merge_ms"] = statistics.median(pm)
    res["peft_unmerge_ms"] = statistics.median(pu)
    drifted = clean.differing(Fingerprint.of(weights.items()))
    res["peft_layers_drifted_after_4_cycles"] = len(drifted)
    res["ratio_merge_ours_over_peft"] = res["ours_merge_ms"] / res["peft_merge_ms"]
    res["ratio_restore_ours_over_peft_unmerge"] = res["ours_restore_ms"] / res["peft_unmerge_ms"]
    res["ratio_merge_ours_over_floor"] = res["ours_merge_ms"] / res["floor_rw_ms"]
    if device == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def step_overhead(mgr: ResidencyManager, model: torch.nn.Module, preset: str, device: str,
                  reps: int = 7) -> dict:
    """One DiT forward at each stage's token count on base and merged weights, and dynamic with
    our forward and with PEFT's: the same model, the same adapter tensors, side by side.

    The kinds are interleaved request by request (base and ours in one request, PEFT's in a
    second, merged in a third), ``reps`` rounds, medians. Stage 1's 1536 tokens leave the full
    DiT host-bound and its times drift by a third over a run on the device box (base and merged
    measured one after the other differed by 50 %, same shapes); interleaving spreads the drift
    over every kind, and the collector is off while timing."""
    from ltx2_pipeline.tiny import tiny_inputs

    out: dict = {}
    rounds = (("base", "merge", "fused"), ("dynamic", "dynamic", "fused"), ("dynamic_peft", "dynamic", "peft"),
              ("merged", "merge", "fused"))
    for stage, (frames, height, width) in STEP_TOKENS[preset].items():
        kw = tiny_inputs(model, frames=frames, height=height, width=width, text_tokens=TEXT_TOKENS[preset],
                         audio_frames=AUDIO_FRAMES[preset])
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        times: dict[str, list[float]] = {}
        gc.collect()
        gc.disable()
        try:
            for rep in range(reps + 1):  # round 0 warms every kind up
                for kind, policy, forward in rounds:
                    mgr.set_merge_policy(policy)
                    mgr.set_dynamic_forward(forward)
                    with torch.no_grad(), mgr.request() as req:
                        dit = req.enter("stage1")
                        if kind != "base":
                            dit = req.enter("stage2")
                        ms = _timed(lambda d=dit, k=kw: d(**k))
                    mgr.synchronize()
                    if rep:
                        times.setdefault(kind, []).append(ms)
        finally:
            gc.enable()
            mgr.set_merge_policy("merge")
            mgr.set_dynamic_forward("fused")
        med = {k: statistics.median(v) for k, v in times.items()}
        out[stage] = {"video_tokens": frames * height * width, **{f"{k}_ms": v for k, v in med.items()},
                      "dynamic_overhead": med["dynamic"] / med["merged"] - 1,
                      "dynamic_peft_overhead": med["dynamic_peft"] / med["merged"] - 1,
                      "dynamic_overhead_vs_base": med["dynamic"] / med["base"] - 1,
                      "dynamic_peft_overhead_vs_base": med["dynamic_peft"] / med["base"] - 1,
                      "merged_vs_base": med["merged"] / med["base"] - 1,
                      "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()}}
    return out


# per kind of round: DiT calls, calls announced with req.prepare (0: none), whether it switches
AHEAD_ROUNDS = {"call": (1, 0, False), "at_switch": (1, 0, True), "ahead": (1, 1, True),
                "calls2": (2, 0, False), "ahead_checked": (2, 2, True)}
# each cost: its round against the round that runs the same calls alone
AHEAD_PAIRS = {"at_switch": "call", "ahead": "call", "ahead_checked": "calls2"}


def merge_ahead_cost(mgr: ResidencyManager, model: torch.nn.Module, preset: str, device: str,
                     reps: int = 7) -> dict:
    """What the switch into stage 2's merge adds to stage 1's last DiT calls, at each stage's token
    count: merged at the switch, ahead behind the last call (``Request.prepare(calls=1)``), or
    ahead over the last two (``calls=2``: checked behind the first, written behind the second).
    Each round runs every kind of :data:`AHEAD_ROUNDS` as its own request; a cost is the paired
    difference to the round of the same calls alone, median over rounds."""
    from ltx2_pipeline.tiny import tiny_inputs

    out: dict = {}
    for stage, (frames, height, width) in STEP_TOKENS[preset].items():
        kw = tiny_inputs(model, frames=frames, height=height, width=width, text_tokens=TEXT_TOKENS[preset],
                         audio_frames=AUDIO_FRAMES[preset])
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        times: dict[str, list[float]] = {k: [] for k in AHEAD_ROUNDS}
        gc.collect()
        gc.disable()
        try:
            for rep in range(reps + 1):
                for kind, (calls, announced, switch) in AHEAD_ROUNDS.items():
                    with torch.no_grad(), mgr.request() as req:
                        dit = req.enter("stage1")

                        def last(d=dit, r=req, x=kw, n=calls, a=announced, sw=switch) -> None:
                            if a:
                                assert r.prepare("stage2", calls=a)
                            for _ in range(n):
                                d(**x)
                            if sw:
                                r.enter("stage2")
                        ms = _timed(last)
                    mgr.synchronize()
                    if rep:
                        times[kind].append(ms)
        finally:
            gc.enable()
        pairs = {k: [t - c for t, c in zip(times[k], times[alone], strict=True)] for k, alone in AHEAD_PAIRS.items()}
        out[stage] = {"video_tokens": frames * height * width, "call_ms": statistics.median(times["call"]),
                      **{f"switch_{k}_ms": statistics.median(v) for k, v in pairs.items()},
                      "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--relative-norm", type=float, default=0.10)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--exact-kernel", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", default="", help="fused tile configs to compare, 'BN,BK,BR,warps,stages;...'")
    ap.add_argument("--no-steps", action="store_true", help="skip the per-step forward overhead")
    args = ap.parse_args(argv)
    configs = [c for c in args.tiles.split(";") if c]
    report(run(args.preset, args.relative_norm, args.requests, args.exact_kernel, args.device, configs,
               steps=not args.no_steps), args.json)
    return 0


def report(res: dict, path: str | None) -> None:
    """Print a benchmark's results as JSON, and write them to ``path`` when given."""
    text = json.dumps(res, indent=1)
    print(text)
    if path:
        with open(path, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
