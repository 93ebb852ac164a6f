"""Reliability harness on the tiny LTX-2 DiT: the fault matrix and the soak.

    python -m ltx2_tools.reliability matrix --write docs/reliability.md
    python -m ltx2_tools.reliability soak --requests 10000

Every injected fault must end in CLEAN (checked bit for bit against an independent host copy)
or QUARANTINED (then ``repair()`` must bring back CLEAN); anything else is a VIOLATION.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ltx2_residency import (
    FAULT_POINTS,
    FaultInjector,
    Fingerprint,
    LoRASpec,
    ManagerOptions,
    QuarantinedError,
    ResidencyError,
    ResidencyManager,
    WeightState,
    testing,
)

from .docblock import replace_block
from .fixture import Fixture, make_fixture

OUTCOMES = ("CLEAN", "QUARANTINED", "VIOLATION", "NOT FIRED")

FAULT_KINDS: dict[str, Callable[[], BaseException]] = {
    "exception": lambda: RuntimeError("injected failure"),
    "keyboard_interrupt": KeyboardInterrupt,
    "cuda_oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
}

#: The policy whose request path passes each fault point, and the stage-1 strength that makes
#: stage 1 apply the LoRA too (so restore and detach run between the phases as well).
POINT_POLICY = {
    "merge.before": "merge", "merge.layer": "merge", "merge.layer.written": "merge", "merge.after": "merge",
    "attach.before": "dynamic", "attach.layer": "dynamic", "attach.after": "dynamic",
    "detach.before": "dynamic", "detach.layer": "dynamic",
    "restore.before": "merge", "restore.layer": "merge", "restore.layer.written": "merge",
    "restore.after": "merge",
    "repair.layer": "merge", "forward": "dynamic",
    "prefetch.before": "merge", "prefetch.after": "merge",
}
#: Points that only a residency mode with a second DiT passes, and the mode used for them.
POINT_MODE = {"prefetch.before": "snapshot", "prefetch.after": "snapshot"}
assert set(POINT_POLICY) == set(FAULT_POINTS), "every fault point needs a scenario"


@dataclass
class Cell:
    point: str
    kind: str
    hit: int  # which hit of the point raised (1 = first, the scenario's last otherwise)
    policy: str
    raised: str  # what the request raised
    outcome: str  # CLEAN, QUARANTINED, VIOLATION
    detail: str


def _request(mgr: ResidencyManager, inputs: dict) -> None:
    with torch.no_grad(), mgr.request(timeout=5) as req:
        req.enter("stage1")(**inputs)
        req.enter("stage2")(**inputs)


def hit_counts(fx: Fixture) -> dict[str, int]:
    """How often each point is hit by its scenario, from a dry run with nothing armed."""
    counts: dict[str, int] = {}
    for mode, policy in sorted({(POINT_MODE.get(p, "original"), pol) for p, pol in POINT_POLICY.items()}):
        faults = FaultInjector()
        mgr = fx.manager(policy, faults, mode=mode)
        at_start = dict(faults.hits)  # building the manager passes some points too
        _request(mgr, fx.inputs)
        counts.update({p: faults.hits.get(p, 0) - at_start.get(p, 0) for p, pol in POINT_POLICY.items()
                       if pol == policy and POINT_MODE.get(p, "original") == mode})
    # a repair is run by hand in its scenario: one hit per managed weight
    counts["repair.layer"] = len(fx.manager("merge").managed_weights)
    return counts


def run_cell(fx: Fixture, point: str, kind: str, hit: int) -> Cell:
    faults = FaultInjector()
    policy = POINT_POLICY[point]
    mgr = fx.manager(policy, faults, mode=POINT_MODE.get(point, "original"))
    clean = testing.weight_bits(mgr.managed_weights)
    if point == "repair.layer":
        # reach QUARANTINED first (a failed restore), then fail the repair itself
        faults.arm("restore.layer", FAULT_KINDS["exception"], on_hit=1)
        with contextlib.suppress(QuarantinedError):
            _request(mgr, fx.inputs)
    faults.arm(point, FAULT_KINDS[kind], on_hit=hit)
    raised = "nothing"
    try:
        if point == "repair.layer":
            mgr.repair()
        else:
            _request(mgr, fx.inputs)
    except BaseException as exc:
        raised = type(exc).__name__
    fired = point in faults.fired
    faults.disarm()
    state = mgr.state
    same = _same(clean, testing.weight_bits(mgr.managed_weights))
    if not fired:
        return Cell(point, kind, hit, policy, raised, "NOT FIRED", "the scenario never reached it")
    half_moved = [n for n, where in mgr.residency().items() if where == "prefetching"]
    if half_moved and state is not WeightState.OFFLOADED:
        return Cell(point, kind, hit, policy, raised, "VIOLATION", f"DiTs left mid-prefetch: {half_moved}")
    if state is WeightState.CLEAN and same:
        outcome, detail = "CLEAN", "bit-exact"
    elif state is WeightState.QUARANTINED:
        try:
            mgr.repair()
            _request(mgr, fx.inputs)
            ok = mgr.state is WeightState.CLEAN and _same(clean, testing.weight_bits(mgr.managed_weights))
            outcome = "QUARANTINED" if ok else "VIOLATION"
            detail = "repair() -> clean, next request ok" if ok else "repair did not restore bits"
        except ResidencyError as exc:
            outcome, detail = "VIOLATION", f"repair failed: {exc}"
    else:
        outcome, detail = "VIOLATION", f"state {state.value}, bits {'same' if same else 'DIFFERENT'}"
    if outcome == "CLEAN":
        try:
            _request(mgr, fx.inputs)  # the next request must be served normally
        except BaseException as exc:
            outcome, detail = "VIOLATION", f"next request failed: {exc!r}"
    return Cell(point, kind, hit, policy, raised, outcome, detail)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def fault_matrix(fx: Fixture) -> list[Cell]:
    counts = hit_counts(fx)
    return [run_cell(fx, point, kind, hit)
            for point in FAULT_POINTS for kind in FAULT_KINDS for hit in sorted({1, counts[point]})]


def render_matrix(cells: list[Cell]) -> str:
    kinds = list(FAULT_KINDS)
    lines = ["| fault point | policy | hits | " + " | ".join(f"{k} (first / last hit)" for k in kinds)
             + " |", "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for point in FAULT_POINTS:
        row = [c for c in cells if c.point == point]
        per_kind = []
        for k in kinds:
            pair = [c for c in row if c.kind == k]
            per_kind.append(" / ".join(c.outcome for c in sorted(pair, key=lambda c: c.hit)))
        hits = max(c.hit for c in row)
        where = row[0].policy + (f" ({POINT_MODE[point]} mode)" if point in POINT_MODE else "")
        lines.append(f"| `{point}` | {where} | {hits} | " + " | ".join(per_kind) + " |")
    counts = {o: sum(c.outcome == o for c in cells) for o in OUTCOMES}
    lines.append("")
    lines.append(f"{len(cells)} faults injected: {counts['CLEAN']} ended CLEAN (bit-exact), "
                 f"{counts['QUARANTINED']} QUARANTINED and repaired; {counts['VIOLATION']} violations, "
                 f"{counts['NOT FIRED']} not fired.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- soak
def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class SoakReport:
    requests: int
    completed: int
    failed_as_injected: int
    quarantines_repaired: int
    drifted_checks: int
    bit_checks: int
    rss_start_mib: float
    rss_end_mib: float
    seconds: float
    merges: int = 0
    vram_start_mib: float | None = None
    vram_end_mib: float | None = None
    vram_peak_mib: float | None = None


def _vram() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


def soak(managers: dict[str, ResidencyManager], faults: FaultInjector, requests: int, seed: int = 0,
         fault_rate: float = 0.1, check_every: int = 1, stage1_off: float = 1 / 3) -> SoakReport:
    """Randomised requests over ``managers`` (one per policy): phases, strengths, faults.

    Clean is checked against an independent reference taken at the start: a host copy of the
    bits on the CPU, a separately computed fingerprint on a GPU (where no host copy fits).
    """
    rng = random.Random(seed)
    cuda = any(w.is_cuda for m in managers.values() for w in m.managed_weights.values())

    def snapshot(m: ResidencyManager) -> object:
        if cuda:
            return Fingerprint.of(m.managed_weights.items()).digests
        return testing.weight_bits(m.managed_weights)

    def same(a: object, b: object) -> bool:
        return a == b if cuda else _same(a, b)  # type: ignore[arg-type]

    cleans = {p: snapshot(m) for p, m in managers.items()}
    points = [p for p in FAULT_POINTS if p != "repair.layer"]
    rss0, vram0 = rss_mib(), _vram()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = failed = repaired = drifted = checks = merges = 0
    for i in range(requests):
        policy = rng.choice(list(managers))
        mgr = managers[policy]
        if rng.random() < fault_rate:
            faults.arm(rng.choice(points), FAULT_KINDS[rng.choice(list(FAULT_KINDS))],
                       on_hit=rng.randint(1, 4))
        s1 = {"distilled": 0.0 if rng.random() < stage1_off else rng.choice([0.25, rng.uniform(0, 1)])}
        s2 = {"distilled": rng.choice([1.0, 0.5, rng.uniform(0, 1.5)])}
        if "user" in mgr.specs:
            s2["user"] = rng.choice([0.0, 0.5])
        records_before = mgr.trace.total
        try:
            with torch.no_grad(), mgr.request(timeout=5) as req:
                req.enter("stage1", strengths=s1)
                if rng.random() < 0.8:  # some requests end after stage 1 (e.g. a preview)
                    req.enter("stage2", strengths=s2)
            done += 1
        except QuarantinedError:
            mgr.repair()
            repaired += 1
        except (ResidencyError, RuntimeError, KeyboardInterrupt, torch.OutOfMemoryError):
            failed += 1
        faults.disarm()
        new = mgr.trace.total - records_before  # this request's records, at the ring's end
        merges += sum(r.event == "merge" for r in list(mgr.trace)[len(mgr.trace) - new:])
        if mgr.state is WeightState.QUARANTINED:
            mgr.repair()
            repaired += 1
        if i % check_every == 0:
            checks += 1
            if not same(cleans[policy], snapshot(mgr)):
                drifted += 1
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return SoakReport(requests, done, failed, repaired, drifted, checks, rss0, rss_mib(),
                      time.perf_counter() - start, merges, vram0, _vram(), peak)


def tiny_soak_managers(fx: Fixture, faults: FaultInjector) -> dict[str, ResidencyManager]:
    return {p: fx.manager(p, faults, native_ltx23=True, trace_maxlen=256)
            for p in ("sglang", "dynamic", "merge")}


def full_soak_manager(faults: FaultInjector) -> dict[str, ResidencyManager]:
    """One real-shape DiT on the GPU (only one fits an 80 GB card alongside its LoRA): the
    sglang policy with the native flag, so HQ stage 1 merges and stage 2 runs dynamic."""
    from .realshape import real_shape_transformer

    model = real_shape_transformer("cuda")
    tensors = testing.synthetic_lora(model, testing.linear_names(model), rank=384, relative_norm=0.10)
    spec = LoRASpec("distilled", tensors=tensors, strengths={"stage1": 0.0, "stage2": 1.0})
    return {"sglang": ResidencyManager(model, loras=[spec], merge_policy="sglang",
                                       options=ManagerOptions(native_ltx23=True, faults=faults, trace_maxlen=256))}


def render_soak(r: SoakReport, command: str) -> str:
    return (
        f"`{command}` on a 2-core CPU (tiny LTX-2 DiT, three managers: sglang with the native "
        f"flag, dynamic, merge; random stage-1/2 strengths, 20 % of requests stop after stage 1, "
        f"a fault armed before {100 * 0.1:.0f} % of requests at a random point, kind and hit):\n\n"
        f"| requests | completed | raised an injected fault | quarantined and repaired | "
        f"bit-exact checks | drifted | RSS start → end (MiB) | seconds |\n"
        f"| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {r.requests:,} | {r.completed:,} | {r.failed_as_injected:,} | {r.quarantines_repaired:,} | "
        f"{r.bit_checks:,} | {r.drifted_checks} | {r.rss_start_mib:.0f} → {r.rss_end_mib:.0f} | "
        f"{r.seconds:.0f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matrix", help="inject every fault kind at every point")
    m.add_argument("--write", type=Path, help="replace the matrix block of this markdown file")
    s = sub.add_parser("soak", help="randomised requests with injected faults")
    s.add_argument("--requests", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fault-rate", type=float, default=0.1)
    s.add_argument("--write", type=Path, help="replace the soak block of this markdown file")
    s.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="full: one real-shape DiT on the GPU")
    s.add_argument("--check-every", type=int, default=1)
    s.add_argument("--stage1-off", type=float, default=1 / 3,
                   help="share of requests whose stage 1 runs on base weights")
    i = sub.add_parser("interrupts", help="Ctrl-C at every line of the request path (ltx2_tools.interrupts)")
    i.add_argument("--every", type=int, default=1, help="sweep every N-th point of each scenario (1: all)")
    i.add_argument("--write", type=Path, help="replace the interrupt-sweep block of this markdown file")
    args = ap.parse_args(argv)
    if args.cmd == "interrupts":
        return _interrupt_sweep(args.every, args.write)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        fx = make_fixture(Path(tmp), num_layers=1)  # cheap; the full preset builds its own DiT
        if args.cmd == "matrix":
            cells = fault_matrix(fx)
            table = render_matrix(cells)
            print(table)
            if args.write:
                args.write.write_text(replace_block(args.write.read_text(), "fault-matrix", table))
            return 0 if all(c.outcome in ("CLEAN", "QUARANTINED") for c in cells) else 1
        faults = FaultInjector()
        managers = (full_soak_manager(faults) if args.preset == "full"
                    else tiny_soak_managers(fx, faults))
        report = soak(managers, faults, args.requests, args.seed, args.fault_rate, args.check_every,
                      args.stage1_off)
        print(json.dumps(asdict(report), indent=1))
        if args.write:
            command = f"python -m ltx2_tools.reliability soak --requests {args.requests}"
            args.write.write_text(replace_block(args.write.read_text(), "soak",
                                                render_soak(report, command)))
        return 0 if report.drifted_checks == 0 else 1


def _interrupt_sweep(every: int, write: Path | None) -> int:
    import tempfile

    from . import interrupts

    with tempfile.TemporaryDirectory() as tmp:
        points = interrupts.sweep(interrupts.block_fixture(Path(tmp)), every=every)
    command = "python -m ltx2_tools.reliability interrupts" + (f" --every {every}" if every != 1 else "")
    table = f"`{command}` (CPU):\n\n" + interrupts.render(points)
    print(table)
    if write:
        write.write_text(replace_block(write.read_text(), "interrupt-sweep", table))
    return 0 if all(p.outcome != "VIOLATION" for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
