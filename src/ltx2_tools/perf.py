"""Performance baselines of the two-stage pipeline in the shape of sglang's diffusion perf baselines
(``expected_e2e_ms``, ``expected_avg_denoise_ms``, ``stages_ms``, tolerances), and ``ltx2 perf-check``.

A case of ``perf_baselines.json`` (package data, next to this module) fixes what moves the numbers
(preset, device, variant, mode, merge policy, size, steps). :func:`run_case` builds the pipeline once,
runs the case's warm-up requests untimed and dropped, then the timed ones; :func:`compare` holds their
medians against the case's expectations. Means are reported, never compared: one cold step (a first
call's allocations, a scheduler hiccup) moves a mean of a few steps past any sane tolerance. The test
suite never asserts a time: it checks this checker on synthetic numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import diffusers
import torch

from ltx2_pipeline.errors import GenerationInputError
from ltx2_pipeline.two_stage import GenerationRequest, LTX2TwoStageHQPipeline, LTX2TwoStagePipeline
from ltx2_residency import REST_STATES, ManagerOptions, ResidencyManager

_AT_REST = {s.value for s in REST_STATES}

GIB = 2**30
#: Shipped as package data, so an installed wheel finds it as a checkout does; ``--baselines`` names another.
DEFAULT_BASELINES = Path(__file__).resolve().with_name("perf_baselines.json")
#: Weight management = every stage named ``LTX2LoRA*``: both switches, the restore and whatever
#: restore stage the pipeline adds (a wait for an overlapped restore), without a list to keep in step.
WEIGHT_STAGE_PREFIX = "LTX2LoRA"
#: Used where neither the file nor the case sets a tolerance. ``stage_abs_floor_ms``: a stage (or
#: the weight-management sum) regresses only past expected·(1+tol) AND expected + floor, so a
#: 0.05 ms switch that takes 0.2 ms on a busy machine is not a 300 % regression.
DEFAULT_TOLERANCES: dict[str, float] = {"e2e": 0.25, "denoise": 0.25, "stage": 0.5, "vram": 0.05,
                                        "stage_abs_floor_ms": 5.0}
DEFAULT_IMPROVEMENT_THRESHOLD = 0.2
#: A case entry cannot be checked while any of these is null (a placeholder to be measured).
REQUIRED = ("expected_e2e_ms", "expected_median_denoise_ms", "stages_ms")
#: The compared metrics and their tolerance keys: medians over the timed requests (and their steps),
#: the weight-management sum of median stages, the peak. ``avg_denoise_ms`` is reported, never compared.
COMPARED: dict[str, str] = {"e2e_ms": "e2e", "median_denoise_ms": "denoise", "weight_management_ms": "stage",
                            "peak_vram_gib": "vram"}
#: The measured metrics a case stores as ``expected_<metric>`` (``--update``).
EXPECTED = ("e2e_ms", "avg_denoise_ms", "median_denoise_ms", "weight_management_ms", "peak_vram_gib")


class BaselineError(GenerationInputError):
    """A baselines file, case name or case entry that cannot be used (``perf-check`` exits 2)."""


class CaseCannotRun(RuntimeError):
    """The case needs hardware this machine lacks (``perf-check`` exits 3)."""


@dataclass(frozen=True)
class CaseSpec:
    """What a case runs. ``steps`` are stage-1 steps (stage 2 always runs the 3 distilled sigmas);
    ``low_vram=None`` leaves snapshot mode's choice to the manager; strings the core validates
    (mode, merge policy, exact-merge kernel) are passed through, so a policy the core adds later needs no
    change here; ``manager_options`` are fields of the manager's :class:`ManagerOptions`."""

    name: str
    preset: str
    device: str
    variant: str = "normal"
    mode: str = "original"
    merge_policy: str = "sglang"
    low_vram: bool | None = None
    height: int = 64
    width: int = 64
    frames: int = 9
    steps: int = 4
    requests: int = 3
    warmup: int = 1
    exact_kernel: str = "auto"
    manager_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> CaseSpec:
        """The spec fields of a ``perf_baselines.json`` case (other keys are its expectations)."""
        given = {f.name: entry[f.name] for f in fields(cls) if f.name != "name" and f.name in entry}
        if "preset" not in given or "device" not in given:
            raise BaselineError(f"case {name!r}: needs a 'preset' and a 'device' field")
        choices = {"preset": ("tiny", "full"), "device": ("cpu", "cuda"), "variant": ("normal", "hq")}
        for key, allowed in choices.items():
            if key in given and given[key] not in allowed:
                raise BaselineError(f"case {name!r}: {key}={given[key]!r}; expected one of {', '.join(allowed)}")
        for key, least in (("height", 1), ("width", 1), ("frames", 1), ("steps", 1), ("requests", 1), ("warmup", 0)):
            value = given.get(key, least)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BaselineError(f"case {name!r}: {key}={value!r}; expected an integer ≥ {least}")
        if given.get("low_vram") not in (None, True, False):
            raise BaselineError(f"case {name!r}: low_vram={given['low_vram']!r}; expected true, false or null")
        if not isinstance(given.get("manager_options", {}), dict):
            raise BaselineError(f"case {name!r}: manager_options must be an object of ManagerOptions fields")
        return cls(name=name, **given)


@dataclass(frozen=True)
class Check:
    """One metric against its expectation. ``limit`` is where it starts to count as a regression."""

    metric: str
    measured: float | None
    expected: float | None
    tolerance: float
    limit: float | None
    unit: str = "ms"
    detail: str = ""
    ok: bool = True
    floor: float = 0.0

    @property
    def over(self) -> float:
        """How far past the limit (in the metric's unit); ≤ 0 within tolerance."""
        return math.inf if self.measured is None or self.limit is None else self.measured - self.limit

    @property
    def over_fraction(self) -> float:
        """measured / expected − 1: +0.40 is 40 % slower than the baseline."""
        return math.inf if self.measured is None or not self.expected else self.measured / self.expected - 1.0

    def __str__(self) -> str:
        if self.detail:
            return f"{self.metric}: {self.detail}"
        return (f"{self.metric}: {_fmt(self.measured)} {self.unit} > limit {_fmt(self.limit)} {self.unit} "
                f"(expected {_fmt(self.expected)}, tolerance {self.tolerance:.0%}, {self.over_fraction:+.0%})")


class Regression(Check):
    """A check past its limit: what :func:`compare` returns."""


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:,.2f}"


# ---------------------------------------------------------------------------- the file
def load_baselines(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read and shape-check a baselines file (``meta``, ``tolerances``, ``cases``)."""
    file = Path(path) if path is not None else DEFAULT_BASELINES
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise BaselineError(f"baselines file {str(file)!r} does not exist; pass --baselines PATH") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baselines file {str(file)!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise BaselineError(f"baselines file {str(file)!r} has no \"cases\" object keyed by case name")
    return doc


def case_baseline(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The case's entry, with ``tolerances`` resolved: defaults < the file's block < the case's own."""
    cases = doc["cases"]
    if name not in cases:
        raise BaselineError(f"unknown case {name!r}; known cases: {', '.join(sorted(cases))}")
    entry = dict(cases[name])
    entry["tolerances"] = {**DEFAULT_TOLERANCES, **doc.get("tolerances", {}), **entry.get("tolerances", {})}
    entry.setdefault("improvement_threshold",
                     doc.get("improvement_reporting", {}).get("threshold", DEFAULT_IMPROVEMENT_THRESHOLD))
    return entry


def missing_expectations(baseline: Mapping[str, Any]) -> list[str]:
    """The required expectations that are null, 0 or empty: nothing to hold a run to."""
    missing = [k for k in REQUIRED if not baseline.get(k)]
    stages = [s for s, v in (baseline.get("stages_ms") or {}).items() if v is None]
    every = bool(stages) and len(stages) == len(baseline["stages_ms"])  # a placeholder: one name, not eight
    return missing + (["stages_ms"] if every else [f"stages_ms.{name}" for name in stages])


def check_expectations(name: str, baseline: Mapping[str, Any]) -> None:
    """Refuse a placeholder: a case whose expectations are still null cannot pass or fail."""
    missing = missing_expectations(baseline)
    if missing:
        status = f" (status: {baseline['status']})" if baseline.get("status") else ""
        raise BaselineError(f"case {name!r} has no expected numbers yet{status}: {', '.join(missing)} null; "
                            f"measure them on its device with `ltx2 perf-check --case {name} --update`")


def update_case(doc: dict[str, Any], name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The measured numbers become the case's expectations; spec fields and tolerances stay."""
    entry = doc["cases"][name]
    entry.update({
        "status": "measured",
        "stages_ms": {k: round(v, 3) for k, v in result["stages_ms"].items()},
        "denoise_step_ms": {p: [round(v, 3) for v in steps] for p, steps in result["denoise_step_ms"].items()},
        **{f"expected_{m}": None if result[m] is None else round(result[m], 3) for m in EXPECTED},
        "measured": {k: result[k] for k in ("device_name", "cpu_count", "torch_threads", "torch", "diffusers",
                                            "exact_kernel", "low_vram", "requests", "warmup")}
                    | {"date": datetime.date.today().isoformat()},
    })
    return entry


def save_baselines(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    file, tmp = Path(path), Path(f"{path}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(file)  # an interrupted --update never leaves half a file


# ---------------------------------------------------------------------------- running a case
def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # the CPU model says more about a CPU baseline than "cpu"
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return model or platform.processor() or platform.machine()


def cli_request(preset: str, height: int, width: int, frames: int, steps: int) -> GenerationRequest:
    """The request ``ltx2 generate`` would send at this size (its prompt, guidance, sequence length)."""
    return GenerationRequest.for_preset(preset, height=height, width=width, num_frames=frames,
                                        num_inference_steps=steps)


def run_case(spec: CaseSpec) -> dict[str, Any]:
    """Build the case's pipeline once, run ``warmup`` untimed and ``requests`` timed requests,
    and return sglang-like metrics (medians over the timed requests)."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise CaseCannotRun(f"case {spec.name!r} needs a CUDA device and this machine has none "
                            f"(torch {torch.__version__}); run it on the device machine or pick a cpu case")
    request = cli_request(spec.preset, spec.height, spec.width, spec.frames, spec.steps)
    cls = LTX2TwoStageHQPipeline if spec.variant == "hq" else LTX2TwoStagePipeline
    options = ManagerOptions(exact_kernel=spec.exact_kernel, **spec.manager_options)
    if spec.low_vram is not None:
        options = dataclasses.replace(options, low_vram=spec.low_vram)
    pipe = cls.from_preset(spec.preset, seed=request.seed, device=spec.device, mode=spec.mode,
                           merge_policy=spec.merge_policy, options=options)
    try:
        pipe.check(request)
        for _ in range(spec.warmup):
            pipe(request)
        reports = [pipe(request).report for _ in range(spec.requests)]
        result = summarize(reports, pipe.manager)
    finally:
        pipe.close()
        del pipe
        gc.collect()  # the next case in this process starts from the memory it would alone
        if spec.device == "cuda":
            torch.cuda.empty_cache()
    return {"case": spec.name, "spec": asdict(spec), "device_name": _device_name(spec.device),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "requests": spec.requests, "warmup": spec.warmup, **result}


def summarize(reports: list[dict[str, Any]], manager: ResidencyManager) -> dict[str, Any]:
    """sglang-like metrics of a pipeline's request reports (medians), with ``manager``'s state after them."""
    last = reports[-1]
    steps = [ms for r in reports for phase in ("stage1", "stage2") for ms in r["denoise_step_ms"].get(phase, [])]
    stages = {name: statistics.median(r["stages_ms"][name] for r in reports)
              for name in last["stages_ms"] if all(name in r["stages_ms"] for r in reports)}
    e2e = statistics.median(r["e2e_ms"] for r in reports)
    weights = sum(ms for name, ms in stages.items() if name.startswith(WEIGHT_STAGE_PREFIX))
    peaks = [r["memory"]["peak_device_bytes"] for r in reports if r["memory"]["peak_device_bytes"] is not None]
    rss = last["memory"]["peak_host_rss_bytes"]
    per_step = {phase: list(zip(*(r["denoise_step_ms"].get(phase, []) for r in reports), strict=False))
                for phase in ("stage1", "stage2")}
    return {
        "pipeline": last["pipeline"], "variant": last["variant"],
        "mode": last["mode"], "merge_policy": last["merge_policy"], "exact_kernel": manager.exact_kernel,
        "low_vram": manager.low_vram, "device": last["device"],
        "e2e_ms": e2e, "e2e_ms_per_request": [r["e2e_ms"] for r in reports],
        "avg_denoise_ms": statistics.fmean(steps) if steps else 0.0,
        "median_denoise_ms": statistics.median(steps) if steps else 0.0,
        "denoise_step_ms": {phase: [statistics.median(at) for at in runs] for phase, runs in per_step.items()},
        "stages_ms": stages,
        "weight_management_ms": weights, "weight_management_fraction": weights / e2e if e2e else 0.0,
        # the pipeline resets the device peak per request: the largest is the case's runtime peak
        "peak_vram_gib": max(peaks) / GIB if peaks else None,
        # ru_maxrss never resets: the process's peak so far (informational, never compared)
        "peak_rss_gib": rss / GIB if rss is not None else None,
        "trace": [r["event"] for r in last["trace"]],
        # the manager's resting state only if every request ended at rest too (low-VRAM snapshot
        # mode rests "offloaded"); otherwise the first state that was not
        "dit_state_after": next((s for s in (r["dit_state_after"] for r in reports) if s not in _AT_REST),
                                manager.state.value),
    }


# ---------------------------------------------------------------------------- comparing
def _check(metric: str, measured: float | None, expected: float, tol: float, floor: float = 0.0,
           unit: str = "ms") -> Check:
    limit = max(expected * (1.0 + tol), expected + floor)
    ok = measured is not None and measured <= limit
    detail = "" if measured is not None else f"not measured (expected {expected:,.2f} {unit})"
    return Check(metric, measured, expected, tol, limit, unit, detail, ok, floor)


def checks(result: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[Check]:
    """Every metric of ``result`` that ``baseline`` has an expectation for, in display order."""
    check_expectations(str(result.get("case", "?")), baseline)
    tol = {**DEFAULT_TOLERANCES, **baseline.get("tolerances", {})}
    floor = tol["stage_abs_floor_ms"]
    # metric -> (tolerance key, absolute floor); optional ones are checked where the case has them
    scalars = {m: (key, floor if key == "stage" else 0.0) for m, key in COMPARED.items()}
    out = [_check(m, result.get(m), baseline[f"expected_{m}"], tol[key], fl, "GiB" if m.endswith("gib") else "ms")
           for m, (key, fl) in scalars.items() if baseline.get(f"expected_{m}") is not None]
    out += [_check(f"stages_ms.{name}", result.get("stages_ms", {}).get(name), expected, tol["stage"], floor)
            for name, expected in baseline["stages_ms"].items()]
    state = result.get("dit_state_after")
    out.append(Check("dit_state_after", None, None, 0.0, None, "", "" if state in _AT_REST else
                     f"the DiT is {state!r} after the requests, not at rest ('clean' or 'offloaded')",
                     state in _AT_REST))
    return out


def compare(result: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[Regression]:
    """The metrics past their limits (empty: within tolerance). Raises :class:`BaselineError`
    for a baseline whose expectations are still null."""
    return [Regression(**asdict(c)) for c in checks(result, baseline) if not c.ok]


def improved(check: Check, threshold: float) -> bool:
    """Faster than the baseline by more than ``threshold`` and than the floor (sglang's improvement
    reporting): a hint to refresh the baseline, never a failure."""
    return check.ok and check.measured is not None and bool(check.expected) and \
        check.measured < min(check.expected * (1.0 - threshold), check.expected - check.floor)


# ---------------------------------------------------------------------------- ltx2 perf-check
def list_cases(doc: Mapping[str, Any]) -> list[str]:
    """One line per case: its spec and expected e2e (or its status while it has none)."""
    lines = []
    for name, entry in doc["cases"].items():
        spec = CaseSpec.from_entry(name, entry)
        e2e = entry.get("expected_e2e_ms")
        expected = f"e2e {e2e:,.1f} ms" if e2e else entry.get("status", "no expectations")
        size = f"{spec.width}x{spec.height}x{spec.frames}"
        lines.append(f"{name:<28} {spec.device:<4} {spec.preset:<4} {spec.variant:<6} {spec.mode:<9} "
                     f"{spec.merge_policy:<8} {size:<12} {spec.steps} steps  {expected}")
    return lines


def _table(name: str, result: Mapping[str, Any], rows: list[Check], threshold: float) -> Any:
    from rich.table import Table

    table = Table(title=f"{name} · {result['device_name']} · {result['mode']} · {result['merge_policy']}")
    # metric names whole (numbers may wrap): a cut name hides which switch stage it is
    table.add_column("metric", no_wrap=True, min_width=max(len(c.metric.removeprefix("stages_ms.")) for c in rows))
    for column in ("measured", "expected", "limit", "status"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for c in rows:
        measured, expected, limit = (str(result.get("dit_state_after")), "at rest", "") if not c.unit else \
            tuple(f"{_fmt(v)} {c.unit}" for v in (c.measured, c.expected, c.limit))
        status = "[bold red]REGRESSION" if not c.ok else "[green]improved" if improved(c, threshold) else "ok"
        table.add_row(c.metric.removeprefix("stages_ms."), measured, expected, limit, status)
    return table


DESCRIPTION = ("Run a case: its warm-up requests first (untimed, dropped), then its timed requests. Compared against "
               "the case's expectations: the median e2e, the median denoise step and each stage's median over the "
               "timed requests, their weight-management sum and the peak device memory. The mean denoise step is "
               "reported, never compared (one cold step moves it). Exit 0 within tolerance, 1 on a regression, 2 on "
               "bad input, 3 when the case cannot run on this machine.")


def add_arguments(perf: argparse.ArgumentParser) -> None:
    """``ltx2 perf-check``'s arguments."""
    perf.add_argument("--case", help="the case to run (see --list)")
    perf.add_argument("--list", action="store_true", help="list the cases and exit")
    perf.add_argument("--baselines", type=Path, metavar="PATH",
                      help="baselines file (default: the perf_baselines.json installed with ltx2_tools)")
    perf.add_argument("--json", type=Path, metavar="OUT", help="write the measured metrics (the plot's input)")
    perf.add_argument("--update", action="store_true",
                      help="rewrite the case's expected numbers from this run (tolerances kept)")


def command(args: Any, console: Any) -> int:
    """``ltx2 perf-check``: 0 within tolerance, 1 regression, 2 bad input, 3 cannot run here."""
    path = args.baselines if args.baselines is not None else DEFAULT_BASELINES
    try:
        doc = load_baselines(path)
        if args.list:
            print("\n".join(list_cases(doc)))
            return 0
        if not args.case:
            raise BaselineError(f"name a case with --case (or --list them); known cases: {', '.join(doc['cases'])}")
        baseline = case_baseline(doc, args.case)
        spec = CaseSpec.from_entry(args.case, baseline)
        if not args.update:
            check_expectations(args.case, baseline)  # before the run: a placeholder never costs a run
        result = run_case(spec)
    except (CaseCannotRun, BaselineError) as exc:
        label, code = (("[bold yellow]cannot run here:[/]", 3) if isinstance(exc, CaseCannotRun)
                       else ("[bold red]error:[/]", 2))
        console.print(f"{label} {exc}", soft_wrap=True)
        return code
    if (measured_on := (baseline.get("measured") or {}).get("device_name", result["device_name"])) != \
            result["device_name"]:  # e.g. an H100 baseline checked on an H200: say so, the limits still apply
        console.print(f"[yellow]note:[/yellow] baseline from {measured_on}, run on {result['device_name']}")
    # --update of a placeholder: nothing to compare with yet
    rows = [] if missing_expectations(baseline) else checks(result, baseline)
    regressions = [c for c in rows if not c.ok]
    if rows:
        console.print(_table(args.case, result, rows, baseline["improvement_threshold"]))
    for c in regressions:
        console.print(f"[bold red]REGRESSION[/bold red] {c}", soft_wrap=True)
    if not args.update and any(improved(c, baseline["improvement_threshold"]) for c in rows):
        console.print(f"improved rows: refresh the baseline with `ltx2 perf-check --case {args.case} --update`")
    console.print(f"weight management {result['weight_management_ms']:,.2f} ms "
                  f"({result['weight_management_fraction']:.2%} of e2e {result['e2e_ms']:,.1f} ms); "
                  f"DiT after the requests: {result['dit_state_after']}", soft_wrap=True)
    if args.json is not None:
        out = {args.case: {**result, "verdict": "regression" if regressions else "ok",
                           "regressions": [asdict(c) for c in regressions]}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.update:
        if result["dit_state_after"] not in _AT_REST:  # a broken run is no baseline
            console.print(f"[bold red]not updated:[/bold red] the DiT is {result['dit_state_after']!r}", soft_wrap=True)
            return 1
        update_case(doc, args.case, result)
        save_baselines(path, doc)
        console.print(f"updated {args.case!r} in {path}", soft_wrap=True)
        return 0
    return 1 if regressions else 0
