"""``ltx2 bench``: our weight management against the PEFT/diffusers baselines on one model, in
one process and one run, with ratios to the baselines and to the floor.

    ltx2 bench --preset tiny                   # CPU, about a minute
    ltx2 bench --preset full --json out.json   # one GPU, real LTX-2 shapes (random weights)

Sections (``--sections``):

- ``weights``: one DiT at the preset's shapes with the distilled LoRA on all its block linears.
  Our merge and exact restore (the restore's critical path and its total) against PEFT's
  ``merge``/``unmerge`` on the very same adapters, the memory floor (one read and one write of
  the adapted weights), the fingerprint (kernel and torch), and one DiT call at each stage's
  token count on base, merged and dynamic (PEFT adapters) weights (:mod:`.bench_switch`).
- ``requests``: the two-stage pipeline end to end, one pipeline built once, per scenario
  (``normal``, ``hq``, ``small``) and merge policy (``merge``, ``dynamic``, ``sglang``,
  ``auto``): sglang-style stage times (:func:`.perf.summarize`), the weight-management share,
  ``auto`` against the best fixed policy, and the request against a dedicated pre-merged DiT
  (the merged run without its switch and restore stages: the same steps, no weight management).
  With ``--compile [MODE]`` the pipeline's DiT runs under ``torch.compile``: the untimed warm-ups
  compile the graphs (their count and compile time are reported), and every timed request should
  compile none (``graphs_compiled_per_request``, ``graphs_compiled_after_warmup``).

Benchmarks report; the test suite checks that this runs and that its arithmetic is right, never a
time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ltx2_residency import CompileSpec, Fingerprint

#: Output size per preset and scenario: (height, width, frames).
SIZES = {"full": {"normal": (512, 768, 121), "hq": (512, 768, 121), "small": (256, 384, 121)},
         "tiny": {"normal": (128, 128, 9), "hq": (128, 128, 9), "small": (64, 64, 9)}}
#: The HQ variant's strengths (per request, on the normal pipeline: one build serves every scenario).
HQ_STRENGTHS = {"stage1": {"distilled": 0.25}, "stage2": {"distilled": 0.5}}
FIXED_POLICIES = ("merge", "merge_at_switch", "dynamic", "sglang")
#: Bench-only names: a merge policy run with the pipeline's merge ahead off (stage 2's merge all at the switch).
AT_SWITCH = {"merge_at_switch": "merge"}
SECTIONS = ("weights", "requests")


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def weights_section(preset: str, device: str, requests: int) -> dict[str, Any]:
    from . import bench_switch  # late: the CLI's parser imports this module

    res = bench_switch.run(preset, 0.10, max(requests, 3), "auto", device)
    floor = res["floor_rw_ms"]
    res["ratios"] = {
        "merge_vs_peft_merge": res["ours_merge_ms"] / res["peft_merge_ms"],
        "restore_critical_path_vs_peft_unmerge": res["ours_restore_host_ms"] / res["peft_unmerge_ms"],
        "restore_total_vs_peft_unmerge": res["ours_restore_ms"] / res["peft_unmerge_ms"],
        "merge_vs_floor": res["ours_merge_ms"] / floor,
        "peft_merge_vs_floor": res["peft_merge_ms"] / floor,
        "fingerprint_kernel_vs_torch": res["fingerprint_ms"] / res["fingerprint_torch_ms"],
        "fingerprint_vs_read_floor": res["fingerprint_ms"] / (floor / 2),  # a fingerprint only reads
        **{f"dynamic_overhead_{stage}": s["dynamic_overhead"] for stage, s in res.get("steps", {}).items()},
        **{f"dynamic_peft_overhead_{stage}": s["dynamic_peft_overhead"] for stage, s in res.get("steps", {}).items()},
        **{f"switch_{kind}_vs_at_switch_{stage}": s[f"switch_{kind}_ms"] / s["switch_at_switch_ms"]
           for stage, s in res.get("ahead", {}).items() for kind in ("ahead", "ahead_checked")},
    }
    return res


#: untimed requests per policy at most, on a compiled DiT (see requests_section)
_MAX_WARMUPS = 4


def _warmup_policies(policies: Sequence[str], compile_spec: CompileSpec | None) -> list[str]:
    """The policies to warm up: on a compiled DiT auto may run a phase either way, so the dynamic
    path's graphs are compiled in the warm-ups too (an engine warms every path it may take)."""
    extra = ["dynamic"] if compile_spec is not None and "auto" in policies and "dynamic" not in policies else []
    return [*extra, *policies]


def requests_section(preset: str, device: str, scenarios: Sequence[str], policies: Sequence[str],
                     requests: int, steps: int, compile_spec: CompileSpec | None = None) -> dict[str, Any]:
    from ltx2_pipeline.two_stage import LTX2TwoStagePipeline

    from .perf import cli_request, summarize

    pipe = LTX2TwoStagePipeline.from_preset(preset, device=device, mode="original", merge_policy="merge",
                                            compile=compile_spec)
    out: dict[str, Any] = {"exact_kernel": pipe.manager.exact_kernel, "overlap_restore": pipe.manager.overlap_restore,
                           "compile": None, "warmup": [], "cases": {}}
    try:
        clean = Fingerprint.of(pipe.manager.managed_weights.items())
        warmed = False
        for scenario in scenarios:
            height, width, frames = SIZES[preset][scenario]
            request = cli_request(preset, height, width, frames, steps)
            if scenario == "hq":
                request = dataclasses.replace(request, strengths=HQ_STRENGTHS)
            pipe.check(request)
            # untimed: every policy at the first scenario (kernels, first merges), then each new
            # scenario's shapes with the first policy. One request each when eager; compiled, until
            # one compiles nothing and decides as the one before it (auto's first measured merge
            # may change its decision, and the graphs of the new path belong in the warm-ups too)
            for policy in (_warmup_policies(policies, compile_spec) if not warmed else policies[:1]):
                _use(pipe, policy)
                decided: list[str] | None = None
                for _ in range(_MAX_WARMUPS if compile_spec is not None else 1):
                    report = pipe(request).report
                    out["compile"] = report["compile"]
                    out["warmup"].append({"case": f"{scenario}/{policy}", "e2e_ms": report["e2e_ms"],
                                          "graphs_compiled": report["graphs_compiled"],
                                          "compile_ms": report["compile_ms"]})
                    events = [r["event"] for r in report["trace"]]
                    if report["graphs_compiled"] == 0 and events == decided:
                        break
                    decided = events
            warmed = True
            gc.collect()
            gc.freeze()  # what lives this long is not rescanned: collector pauses stay out of the timings
            reports: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
            for _ in range(requests):
                for policy in policies:  # interleaved: drift (clocks, allocator) falls on every policy alike
                    _use(pipe, policy)
                    reports[policy].append(pipe(request).report)
            for policy in policies:
                case = summarize(reports[policy], pipe.manager)
                case["decisions"] = [r["event"] for r in reports[policy][-1]["trace"]]
                # after the warm-ups, a compiled DiT runs every timed request on graphs it has: 0 each
                case["graphs_compiled_per_request"] = [r["graphs_compiled"] for r in reports[policy]]
                out["cases"][f"{scenario}/{policy}"] = case
                print(f"{scenario}/{policy}: e2e {case['e2e_ms']:.1f} ms (each: "
                      f"{', '.join(f'{x:.0f}' for x in case['e2e_ms_per_request'])}), weight management "
                      f"{case['weight_management_ms']:.1f} ms"
                      + (f", graphs compiled {case['graphs_compiled_per_request']}" if out["compile"] else ""),
                      flush=True)
        out["graphs_compiled_after_warmup"] = sum(sum(c["graphs_compiled_per_request"])
                                                  for c in out["cases"].values())
        pipe.manager.verify_clean()
        out["drift_layers_after_all_requests"] = len(clean.differing(
            Fingerprint.of(pipe.manager.managed_weights.items())))
    finally:
        gc.unfreeze()
        pipe.close()
    out["derived"] = derive(out["cases"], scenarios, policies)
    return out


def _use(pipe: Any, policy: str) -> None:
    pipe.manager.set_merge_policy(AT_SWITCH.get(policy, policy))
    pipe.merge_ahead = policy not in AT_SWITCH


def derive(cases: dict[str, Any], scenarios: Sequence[str], policies: Sequence[str]) -> dict[str, Any]:
    """Per scenario: ``auto`` against the best fixed policy, and each policy's request against a
    dedicated pre-merged DiT (the ``merge`` run without its weight-management stages)."""
    out: dict[str, Any] = {}
    for scenario in scenarios:
        runs = {p: cases[f"{scenario}/{p}"] for p in policies if f"{scenario}/{p}" in cases}
        d: dict[str, Any] = {}
        fixed = {p: r["e2e_ms"] for p, r in runs.items() if p in FIXED_POLICIES}
        if fixed:
            best = min(fixed, key=fixed.__getitem__)
            d["best_fixed_policy"], d["best_fixed_e2e_ms"] = best, fixed[best]
            if "auto" in runs:
                d["auto_vs_best_fixed"] = runs["auto"]["e2e_ms"] / fixed[best] - 1
                # e2e carries the run-to-run spread of stages no policy touches; the decisions don't
                d["auto_decides_as"] = [p for p in fixed if runs[p].get("decisions") == runs["auto"].get("decisions")]
        if "merge" in runs or "merge_at_switch" in runs:
            # the merge paid at the switch leaves stage 1 as a dedicated DiT runs it; merged ahead,
            # part of its cost moves into stage 1's last step, which the stages do not separate
            merged = runs.get("merge_at_switch", runs.get("merge"))
            premerged = merged["e2e_ms"] - merged["weight_management_ms"]
            d["premerged_e2e_ms"] = premerged
            d["vs_premerged"] = {p: r["e2e_ms"] / premerged - 1 for p, r in runs.items()}
        out[scenario] = d
    return out


def run(preset: str, device: str, sections: Sequence[str], scenarios: Sequence[str], policies: Sequence[str],
        requests: int, steps: int, compile_spec: CompileSpec | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {
        "preset": preset,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "versions": _versions(), "requests_per_case": requests, "stage1_steps": steps,
    }
    if "weights" in sections:
        res["weights"] = weights_section(preset, device, requests)
        _cleanup(device)
    if "requests" in sections:
        res["requests"] = requests_section(preset, device, scenarios, policies, requests, steps, compile_spec)
        _cleanup(device)
    return res


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("diffusers", "peft", "triton", "transitions"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def print_summary(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "weights" in res:
        w = res["weights"]
        t = Table(title=f"weights: {res['device']}, {w['lora_layers']} layers, rank {w['rank']}, "
                        f"{w['adapted_weight_gib']:.1f} GiB adapted")
        for col in ("", "ours", "baseline", "ours / baseline", "ours / floor"):
            t.add_column(col, justify="right" if col else "left")
        floor = w["floor_rw_ms"]
        t.add_row("merge (ms)", f"{w['ours_merge_ms']:.1f}", f"PEFT {w['peft_merge_ms']:.1f}",
                  f"{w['ratios']['merge_vs_peft_merge']:.2f}", f"{w['ratios']['merge_vs_floor']:.2f}")
        t.add_row("restore, critical path (ms)", f"{w['ours_restore_host_ms']:.1f}",
                  f"PEFT unmerge {w['peft_unmerge_ms']:.1f}",
                  f"{w['ratios']['restore_critical_path_vs_peft_unmerge']:.3f}", "")
        t.add_row("restore, total (ms)", f"{w['ours_restore_ms']:.1f}", "", "",
                  f"{w['ours_restore_ms'] / floor:.2f}")
        t.add_row("exact after every restore", "yes", f"PEFT: {w['peft_layers_drifted_after_4_cycles']} layers "
                  "drifted", "", "")
        t.add_row("fingerprint (ms)", f"{w['fingerprint_ms']:.1f}", f"torch {w['fingerprint_torch_ms']:.1f}",
                  f"{w['ratios']['fingerprint_kernel_vs_torch']:.3f}",
                  f"{w['ratios']['fingerprint_vs_read_floor']:.2f}")
        for stage, s in w.get("steps", {}).items():
            t.add_row(f"{stage} call, {s['video_tokens']} tokens (ms; merged {s['merged_ms']:.1f})",
                      f"dynamic {s['dynamic_ms']:.1f} (+{s['dynamic_overhead']:.1%})",
                      f"PEFT dynamic {s['dynamic_peft_ms']:.1f} (+{s['dynamic_peft_overhead']:.1%})",
                      f"{s['dynamic_ms'] / s['dynamic_peft_ms']:.2f}", "")
        for stage, s in w.get("ahead", {}).items():
            for kind, calls in (("ahead", "call"), ("ahead_checked", "2 calls")):
                t.add_row(f"switch after a {stage} {calls}, {s['video_tokens']} tokens (ms)",
                          f"{kind.replace('_', ' ')} {s[f'switch_{kind}_ms']:.1f}",
                          f"at the switch {s['switch_at_switch_ms']:.1f}",
                          f"{s[f'switch_{kind}_ms'] / s['switch_at_switch_ms']:.2f}", "")
        console.print(t)
    if "requests" in res:
        r = res["requests"]
        t = Table(title=f"requests ({res['requests_per_case']} per case, median; exact kernel {r['exact_kernel']}, "
                        f"overlapped: {r['overlap_restore']})")
        for col in ("case", "e2e ms", "weight mgmt ms", "share", "vs pre-merged DiT", "stage-2 step ms"):
            t.add_column(col, justify="left" if col == "case" else "right")
        for name, case in r["cases"].items():
            scenario, policy = name.split("/")
            vs = r["derived"].get(scenario, {}).get("vs_premerged", {}).get(policy)
            step2 = case["denoise_step_ms"].get("stage2") or [0.0]
            t.add_row(name, f"{case['e2e_ms']:.1f}", f"{case['weight_management_ms']:.1f}",
                      f"{case['weight_management_fraction']:.2%}", "" if vs is None else f"{vs:+.2%}",
                      f"{statistics.median(step2):.1f}")
        console.print(t)
        for scenario, d in r["derived"].items():
            if "auto_vs_best_fixed" in d:
                same = ", ".join(d["auto_decides_as"]) or "no fixed policy"
                console.print(f"{scenario}: auto {d['auto_vs_best_fixed']:+.2%} against the best fixed policy "
                              f"({d['best_fixed_policy']}); auto decided as {same}")
        if r.get("compile"):
            spec, warm = r["compile"], r["warmup"]
            each = ", ".join(f"{w['case']} {w['graphs_compiled']}" for w in warm)
            console.print(f"DiT compiled (mode {spec['mode']}, backend {spec['backend']}): the untimed warm-up "
                          f"requests compiled {sum(w['graphs_compiled'] for w in warm)} graphs ({each}; the first "
                          f"took {warm[0]['e2e_ms'] / 1e3:,.1f} s, {warm[0]['compile_ms'] / 1e3:,.1f} s of it "
                          f"compiling); the timed requests compiled {r['graphs_compiled_after_warmup']}")
        console.print(f"drift after all requests: {r['drift_layers_after_all_requests']} layers")


#: Flags that only the ``requests`` section reads, with their defaults.
REQUEST_FLAGS = {"scenarios": ["normal", "hq", "small"], "policies": [*FIXED_POLICIES, "auto"], "steps": 4}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from ltx2_pipeline.checks import device, positive_int  # light: torch and the pipeline's errors only
    from ltx2_pipeline.compiling import add_compile_arguments  # light: torch, the core and those errors

    ap.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--device", type=device, default=None, help="default: cuda when there is one, else cpu")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--scenarios", nargs="+", choices=("normal", "hq", "small"), default=None,
                    help="requests section only (default: all)")
    ap.add_argument("--policies", nargs="+", choices=(*FIXED_POLICIES, "auto"), default=None,
                    help="requests section only (default: all)")
    ap.add_argument("--requests", type=positive_int, default=3,
                    help="timed requests per case, the policies interleaved (after untimed warm-ups)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help=f"requests section only: stage-1 denoising steps (default {REQUEST_FLAGS['steps']})")
    ap.add_argument("--json", default=None, help="write the results here (in an existing directory)")
    add_compile_arguments(ap)  # requests section only: the weights section times kernels, not the DiT


def check_arguments(args: argparse.Namespace) -> str:
    """Every argument checked before anything is built; the device to run on. Flags the chosen
    sections do not read are refused (not ignored), the defaults of the others filled in."""
    from pathlib import Path

    from ltx2_pipeline.checks import GIB, check_device, check_fits, check_output_path
    from ltx2_pipeline.compiling import compile_arguments
    from ltx2_pipeline.errors import GenerationInputError

    for name, default in REQUEST_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif "requests" not in args.sections:
            raise GenerationInputError(f"--{name} applies to the requests section only, not to --sections "
                                       f"{' '.join(args.sections)}; drop it or add the requests section")
    if args.compile is not None and "requests" not in args.sections:
        raise GenerationInputError(f"--compile applies to the requests section only (the pipeline's DiT), not to "
                                   f"--sections {' '.join(args.sections)}; drop it or add the requests section")
    args.compile_spec = compile_arguments(args)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    if args.json is not None:
        check_output_path("--json", Path(args.json))
    if args.preset == "full":
        from ltx2_pipeline.presets import full_preset_bytes

        held = full_preset_bytes()
        lora = held["distilled_lora"]
        needs = {}
        if "weights" in args.sections:  # one DiT, the LoRA for us and a copy in PEFT's adapters
            needs["weights"] = (held["transformer"] + 2 * lora,
                                f"the DiT {held['transformer'] / GIB:.1f} GiB + the LoRA twice (ours and PEFT's) "
                                f"{2 * lora / GIB:.1f} GiB")
        if "requests" in args.sections:  # the whole two-stage pipeline
            pipeline = sum(held.values()) - lora
            needs["requests"] = (pipeline + lora,
                                 f"the pipeline {pipeline / GIB:.1f} GiB + the LoRA {lora / GIB:.1f} GiB")
        section = max(needs, key=lambda k: needs[k][0])
        check_fits(f"ltx2 bench --preset full (its {section} section)", needs[section][0], device,
                   needs[section][1], "run it on a GPU with the memory, or use --preset tiny")
    return str(device)


DESCRIPTION = __doc__.split("\n\n")[0]


def command(args: argparse.Namespace, console: object = None) -> int:
    device = check_arguments(args)
    res = run(args.preset, device, args.sections, args.scenarios, args.policies, args.requests, args.steps,
              args.compile_spec)
    print_summary(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0
