"""Managers on several ranks (``process_group=``): real gloo groups of spawned processes, the tiny DiT.

Each test runs a scenario on every rank (``tests/ranks.py``) and checks what every rank saw:
a step commits on every rank or on none, a rank's failure is every rank's failure, and between
requests every rank's DiT is bit-identical to clean (or every rank's is quarantined).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import (
    FAULT_POINTS,
    ApplyKind,
    FaultInjector,
    LoRAFormatError,
    LoRASpec,
    LoRAValidationError,
    ManagerOptions,
    ResidencyError,
    ResidencyManager,
)
from ltx2_residency.errors import CollectiveTimeoutError, PeerFailedError, RankMismatchError
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits
from ranks import run_ranks

STAGE2 = {"stage1": 0.0, "stage2": 1.0}


class Injected(RuntimeError):
    """The fault a test arms on one rank."""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lockstep")
    dit = tiny_transformer(seed=0)
    names = linear_names(dit)
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    return {
        "distilled": save_lora(root / "distilled.safetensors", synthetic_lora(dit, names, rank=4, seed=1)),
        "user": save_lora(root / "user.safetensors", synthetic_lora(dit, names[:6], rank=2, seed=2)),
        "corrupt": str(corrupt),
        "missing": str(root / "missing.safetensors"),
    }


# ----------------------------------------------------------------------------- on every rank
def _manager(dit: torch.nn.Module, path: str, policy: str = "merge", faults: FaultInjector | None = None,
             timeout: float = 60.0, **kwargs: Any) -> ResidencyManager:
    return ResidencyManager(dit, "original", [LoRASpec("distilled", path=path, strengths=STAGE2)], policy,
                            process_group=dist.group.WORLD,
                            options=ManagerOptions(collective_timeout=timeout, faults=faults), **kwargs)


def _clean(mgr: ResidencyManager, clean: dict[str, torch.Tensor]) -> bool:
    now = weight_bits(mgr.managed_weights)
    return all(torch.equal(clean[n], now[n]) for n in clean)


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def lockstep_requests(rank: int, world: int, path: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=0)
    mgr = _manager(dit, path, policy="auto")
    clean = weight_bits(mgr.managed_weights)
    if rank == 1:  # this rank's policy would run stage 2 dynamic: rank 0's decision is taken instead
        mgr._switch._decide = lambda *a, **k: ApplyKind.DYNAMIC  # type: ignore[method-assign]
    else:
        mgr._switch._decide = lambda *a, **k: ApplyKind.MERGED  # type: ignore[method-assign]
    inputs = tiny_inputs(dit, seed=0)
    outputs = []
    for strength in (1.0, 0.5, 0.25):
        with mgr.request() as req:
            req.enter("stage1")(**inputs)
            outputs.append(req.enter("stage2", {"distilled": strength})(**inputs)[0])
    events = [r.event for r in mgr.trace]
    return {"outputs": [o.float().sum().item() for o in outputs], "events": events,
            "state": mgr.state.value, "clean": _clean(mgr, clean)}


def test_ranks_switch_in_lock_step_and_take_rank_0s_decision(files: dict[str, str]) -> None:
    results = run_ranks(2, lockstep_requests, files["distilled"])
    assert results[0]["outputs"] == results[1]["outputs"]
    assert results[0]["events"] == results[1]["events"]
    # rank 0 merged: so did rank 1, against its own policy
    assert results[1]["events"].count("merged_stage2") == 3 and "attach" not in results[1]["events"]
    assert all(r["state"] == "clean" and r["clean"] for r in results)


def corrupt_file_on_one_rank(rank: int, world: int, good: str, bad: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=0)
    before = weight_bits({n: p for n, p in dit.named_parameters()})
    try:
        _manager(dit, bad if rank == 1 else good)
    except ResidencyError as exc:
        error: BaseException = exc
    after = weight_bits({n: p for n, p in dit.named_parameters()})
    untouched = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    wrapped = any("lora" in type(m).__name__.lower() for m in dit.modules())
    return {"type": type(error).__name__, "validation": isinstance(error, LoRAValidationError),
            "format": isinstance(error, LoRAFormatError), "peer": isinstance(error, PeerFailedError),
            "ranks": getattr(error, "ranks", None), "message": str(error), "untouched": untouched,
            "wrapped": wrapped}


def test_a_lora_one_rank_refuses_is_refused_on_every_rank_naming_that_rank(files: dict[str, str]) -> None:
    r0, r1 = run_ranks(2, corrupt_file_on_one_rank, files["distilled"], files["corrupt"])
    assert r1["format"] and not r1["peer"]  # the failing rank: its own error
    assert r0["peer"] and r0["validation"] and r0["ranks"] == [1] and "rank 1" in r0["message"]
    assert r0["untouched"] and r1["untouched"] and not r0["wrapped"] and not r1["wrapped"]


def fault_on_one_rank(rank: int, world: int, path: str, point: str, policy: str) -> dict[str, Any]:
    faults = FaultInjector()
    dit = tiny_transformer(seed=0)
    mgr = _manager(dit, path, policy=policy, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    inputs = tiny_inputs(dit, seed=0)
    if rank == world - 1:
        faults.arm(point, lambda: Injected(f"{point} on rank {rank}"))
    raised: list[str] = []
    try:
        with mgr.request() as req:
            req.enter("stage1")(**inputs)
            req.enter("stage2")(**inputs)
    except BaseException as exc:
        raised.append(type(exc).__name__)
    state = mgr.state.value
    states = _gather(state)
    if state == "quarantined":
        mgr.repair()
    # the next request runs on every rank as usual
    with mgr.request() as req:
        req.enter("stage1")(**inputs)
        out = req.enter("stage2")(**inputs)[0].float().sum().item()
    return {"raised": raised, "states": states, "clean": _clean(mgr, clean), "next": out,
            "fired": list(faults.fired)}


@pytest.mark.parametrize(("point", "policy", "after"), [
    ("merge.layer", "merge", "clean"),  # a merge fails part way on one rank: every rank rolls back
    ("merge.after", "merge", "clean"),
    ("attach.layer", "dynamic", "clean"),
    ("restore.layer", "merge", "quarantined"),  # an undo fails on one rank: every rank is quarantined
    ("forward", "merge", "clean"),  # one rank's request ends early (its DiT call raised)
])
def test_a_failure_on_one_rank_is_every_ranks(files: dict[str, str], point: str, policy: str, after: str) -> None:
    results = run_ranks(2, fault_on_one_rank, files["distilled"], point, policy)
    failing, other = results[-1], results[0]
    assert failing["fired"] == [point]
    assert failing["raised"] == ["Injected"] or (after == "quarantined" and failing["raised"])
    assert other["raised"] and other["raised"][0] in ("PeerFailedError", "PeerQuarantinedError")
    assert all(r["states"] == [after] * 2 for r in results)
    assert all(r["clean"] for r in results)
    assert results[0]["next"] == results[1]["next"]


def add_lora_on_ranks(rank: int, world: int, path: str, user: str, missing: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=0)
    mgr = _manager(dit, path)
    try:
        mgr.add_lora(LoRASpec("style", path=missing if rank == 1 else user))
        refused = ""
    except ResidencyError as exc:
        refused = type(exc).__name__
    registered = sorted(mgr.loras)
    mgr.add_lora(LoRASpec("style", path=user))  # the same name is free on every rank
    inputs = tiny_inputs(dit, seed=0)
    with mgr.request(loras={"style": 0.5}) as req:
        out = req.enter("stage1")(**inputs)[0].float().sum().item()
    try:
        mgr.request(loras={"style": 0.5} if rank == 0 else {"style": float("nan")})
        bad = ""
    except ResidencyError as exc:
        bad = type(exc).__name__
    return {"refused": refused, "registered": registered, "out": out, "bad": bad, "state": mgr.state.value}


def test_add_lora_and_a_requests_choice_are_refused_everywhere_if_one_rank_refuses(files: dict[str, str]) -> None:
    r0, r1 = run_ranks(2, add_lora_on_ranks, files["distilled"], files["user"], files["missing"])
    assert r1["refused"] == "LoRAFormatError" and r0["refused"] == "PeerLoRAFormatError"
    assert r0["registered"] == r1["registered"] == ["distilled"]
    assert r0["out"] == r1["out"]
    assert r1["bad"] == "StrengthError" and r0["bad"] == "PeerStrengthError"
    assert r0["state"] == r1["state"] == "clean"


def differing_weights(rank: int, world: int, path: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=rank)  # a rank loaded another checkpoint
    before = weight_bits(dict(dit.named_parameters()))
    try:
        _manager(dit, path)
        error = ""
    except RankMismatchError as exc:
        error = str(exc)
    after = weight_bits(dict(dit.named_parameters()))
    return {"error": error, "untouched": all(torch.equal(before[n], after[n]) for n in before),
            "wrapped": any("lora" in type(m).__name__.lower() for m in dit.modules())}


def test_ranks_with_different_weights_refuse_to_build(files: dict[str, str]) -> None:
    for r in run_ranks(2, differing_weights, files["distilled"]):
        assert "differ between ranks" in r["error"] and r["untouched"] and not r["wrapped"]


def different_arguments(rank: int, world: int, path: str) -> str:
    try:
        _manager(tiny_transformer(seed=0), path, policy="merge" if rank == 0 else "dynamic")
    except RankMismatchError as exc:
        return str(exc)
    return ""


def test_ranks_built_with_different_arguments_refuse(files: dict[str, str]) -> None:
    for message in run_ranks(2, different_arguments, files["distilled"]):
        assert "policy" in message and "rank 1" in message


def a_rank_that_never_comes(rank: int, world: int, path: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=0)
    dist.barrier()  # the ranks build together: the build's own steps have the short timeout too
    mgr = _manager(dit, path, timeout=8.0)
    clean = weight_bits(mgr.managed_weights)
    if rank == 1:  # stuck elsewhere: it never opens the request
        import time

        time.sleep(20.0)
        return {"error": "", "clean": True}
    try:
        with mgr.request() as req:
            req.enter("stage1")
        error = ""
    except CollectiveTimeoutError as exc:
        error = str(exc)
    return {"error": error, "clean": _clean(mgr, clean), "state": mgr.state.value}


def test_a_rank_that_never_answers_is_a_typed_timeout_not_a_hang(files: dict[str, str]) -> None:
    r0, _ = run_ranks(2, a_rank_that_never_comes, files["distilled"], timeout=120)
    assert "did not answer within 8.0 s" in r0["error"] and r0["clean"] and r0["state"] == "clean"


def ranks_out_of_step(rank: int, world: int, path: str) -> dict[str, Any]:
    dit = tiny_transformer(seed=0)
    mgr = _manager(dit, path)
    inputs = tiny_inputs(dit, seed=0)
    raised = ""
    try:
        with mgr.request() as req:
            req.enter("stage1")(**inputs)
            if rank == 0:
                req.prepare("stage2", calls=1)  # a call the other rank does not make
            req.enter("stage2")(**inputs)
    except ResidencyError as exc:
        raised = type(exc).__name__
    return {"raised": raised, "state": mgr.state.value}


def test_ranks_making_different_calls_fail_the_step_and_stay_clean(files: dict[str, str]) -> None:
    for r in run_ranks(2, ranks_out_of_step, files["distilled"]):
        assert r["raised"] == "RankMismatchError" and r["state"] == "clean"


# ----------------------------------------------------------------------------- the soak
SOAK_POINTS = [p for p in FAULT_POINTS if not p.startswith(("prefetch", "repair"))]


def soak(rank: int, world: int, path: str, requests: int, seed: int) -> dict[str, Any]:
    """``requests`` requests; before each, a fault is armed on one rank at a random point (the
    same draw on every rank). After each, every rank reports its state and whether its DiT is
    bit-identical to clean; a quarantined DiT is repaired."""
    faults = FaultInjector()
    dit = tiny_transformer(seed=0)
    mgr = _manager(dit, path, faults=faults, timeout=60.0)
    clean = weight_bits(mgr.managed_weights)
    inputs = tiny_inputs(dit, seed=0)
    draw = random.Random(seed)
    outcomes: list[tuple[str, ...]] = []
    drift = 0
    faults_fired = 0
    for _ in range(requests):
        victim = draw.randrange(world)
        point = draw.choice(SOAK_POINTS)
        on_hit = draw.randint(1, 3)
        policy = draw.choice(["merge", "dynamic", "sglang"])
        strength = draw.choice([1.0, 0.5, 0.75])
        interrupt = draw.random() < 0.1
        mgr.set_merge_policy(policy)
        if rank == victim:
            fault = KeyboardInterrupt() if interrupt else Injected(point)
            faults.arm(point, lambda fault=fault: fault, on_hit=on_hit)  # type: ignore[misc]
        try:
            with mgr.request() as req:
                req.enter("stage1")(**inputs)
                req.enter("stage2", {"distilled": strength})(**inputs)
        except (ResidencyError, Injected, KeyboardInterrupt):
            pass
        faults_fired += len(faults.fired)
        faults.disarm()
        states = tuple(_gather(mgr.state.value))
        outcomes.append(states)
        if mgr.state.value == "quarantined":
            mgr.repair()  # on every rank: they all are
        elif not _clean(mgr, clean):
            drift += 1
    return {"outcomes": outcomes, "drift": drift, "fired": faults_fired, "state": mgr.state.value}


@pytest.mark.parametrize("world", [2, 4])
def test_a_thousand_requests_with_faults_on_a_random_rank(files: dict[str, str], world: int) -> None:
    results = run_ranks(world, soak, files["distilled"], 1000, 7, timeout=1500)
    outcomes = results[0]["outcomes"]
    assert all(r["outcomes"] == outcomes for r in results)
    mixed = [o for o in outcomes if len(set(o)) != 1]
    assert mixed == [], f"{len(mixed)} requests ended with ranks in different states: {mixed[:3]}"
    assert {o[0] for o in outcomes} <= {"clean", "quarantined"}
    assert all(r["drift"] == 0 for r in results)
    assert sum(r["fired"] for r in results) > 300  # the faults did fire
    assert any(o[0] == "quarantined" for o in outcomes)
    assert all(r["state"] == "clean" for r in results)


def test_no_group_is_a_single_manager(files: dict[str, str], model: torch.nn.Module, tmp_path: Path) -> None:
    mgr = ResidencyManager(model, "original", [LoRASpec("distilled", path=files["distilled"], strengths=STAGE2)],
                           "merge")
    assert mgr._peers.size == 1
    with mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state.value == "clean"


def test_the_documented_example_runs_under_torchrun(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    from ranks import free_port

    doc = (Path(__file__).resolve().parents[2] / "docs" / "embedding.md").read_text()
    section = doc[doc.index("## Several GPUs"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           f"--master-port={free_port()}", str(script)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two processes share one stdout: their lines may interleave
    assert sorted(re.findall(r"rank (\d): (clean|quarantined)", done.stdout)) == [("0", "clean"), ("1", "clean")]
