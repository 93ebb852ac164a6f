"""Requests with random LoRA mixes from several threads while LoRAs are added and removed.

    python -m ltx2_tools.lora_soak --requests 1000 --threads 4
    python -m ltx2_tools.lora_soak --requests 1000 --threads 4 --device cuda --json soak.json

On the tiny DiT: each request chooses 0-2 of the registered user LoRAs (Zipf popularity) plus the
distilled LoRA at random strengths and runs both stages; an admin thread adds and removes user LoRAs
meanwhile. It reports drift (the managed weights against their clean bits after every request and at
the end), the process's resident memory (at the start, once a tenth of the requests has run, and at
the end), the device bytes allocated (before the soak, with the DiT and the manager built, and once
both are dropped: as before unless something leaked), the host cache and slot statistics, and
whether every thread finished (a deadlock shows as threads left running). The device bytes leave out
cuBLAS's workspaces: torch keeps one per thread and stream for the life of the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import (
    DirtyWeightsError,
    LoRASpec,
    ManagerOptions,
    ResidencyManager,
    UnknownLoRAError,
    testing,
)

#: user LoRAs written to disk for the soak: (layers, rank)
POOL_RANKS = (2, 4, 4, 6, 8, 8, 4, 2)


@dataclass
class SoakResult:
    requests: int
    threads: int
    served: int = 0
    refused_unknown: int = 0
    errors: list[str] = field(default_factory=list)
    drift_checks: int = 0
    drifted: int = 0
    adds: int = 0
    removes: int = 0
    finished: bool = False
    rss_start_mib: float = 0.0
    rss_warm_mib: float = 0.0  # once a tenth of the requests has run: threads, allocators, kernels set up
    rss_end_mib: float = 0.0
    device_bytes_before: int = 0  # the process's own, before the soak builds anything
    device_bytes_start: int = 0
    device_bytes_end: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.finished and not self.errors and not self.drifted and self.served > 0
                and self.device_bytes_end <= self.device_bytes_before)


def device_bytes(device: str) -> int:
    """Bytes the caching allocator has handed out on ``device``, cuBLAS's per-thread workspaces left out."""
    if not device.startswith("cuda"):
        return 0
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()  # torch's own: kept per (thread, stream) until the process ends
    return int(torch.cuda.memory_allocated(device))


def rss_mib() -> float:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _serve(requests: int = 1000, threads: int = 4, seed: int = 0, device: str = "cpu", policy: str = "auto",
        timeout_s: float = 600.0) -> SoakResult:
    """The soak itself; the manager and its requests are gone when it returns."""
    dit = tiny_transformer(seed=0).to(device)
    layers = testing.linear_names(dit)
    folder = Path(tempfile.mkdtemp(prefix="ltx2_lora_soak_"))
    rng = random.Random(seed)
    pool = {}
    for i, rank in enumerate(POOL_RANKS):
        chosen = sorted(rng.sample(layers, k=max(2, len(layers) // 4)))
        pool[f"user{i}"] = testing.save_lora(folder / f"user{i}.safetensors",
                                     testing.synthetic_lora(dit, chosen, rank=rank, relative_norm=0.15, seed=100 + i))
    distilled = LoRASpec("distilled", tensors=testing.synthetic_lora(dit, layers, rank=8, relative_norm=0.1, seed=1))
    one = max(os.path.getsize(p) for p in pool.values())
    mgr = ResidencyManager(dit, "original", [distilled], policy,
                           options=ManagerOptions(host_lora_cache_bytes=3 * one, request_timeout=timeout_s))
    for name in list(pool)[:4]:
        mgr.add_lora(LoRASpec(name, path=pool[name]))
    inputs = tiny_inputs(dit, seed=0)
    clean = testing.weight_bits(mgr.managed_weights)
    result = SoakResult(requests, threads, rss_start_mib=rss_mib(), device_bytes_start=device_bytes(device))
    warm = max(1, requests // 10)
    lock = threading.Lock()
    per_thread = [requests // threads + (i < requests % threads) for i in range(threads)]

    def note(error: BaseException) -> None:
        with lock:
            result.errors.append(repr(error))

    def worker(index: int) -> None:
        r = random.Random(seed * 1000 + index)
        for _ in range(per_thread[index]):
            names = sorted(n for n in mgr.loras if n != "distilled")
            weights = [1.0 / (1 + int(n[4:])) for n in names]  # Zipf over the pool's order
            picked = set(r.choices(names, weights=weights, k=r.randint(0, 2))) if names else set()
            mix: dict[str, Any] = {n: round(r.uniform(0.2, 1.2), 2) for n in picked}
            mix["distilled"] = {"stage2": 1.0}
            try:
                with torch.no_grad(), mgr.request(loras=mix) as req:
                    req.enter("stage1")(**inputs)
                    if r.random() < 0.9:
                        req.enter("stage2")(**inputs)
                with lock:
                    result.served += 1
                    if result.served == warm:
                        result.rss_warm_mib = rss_mib()
                if r.random() < 0.05:  # between requests: every managed weight bit-identical to clean
                    with lock:
                        result.drift_checks += 1
                    try:
                        mgr.verify_clean()
                    except DirtyWeightsError:
                        with lock:
                            result.drifted += 1
            except UnknownLoRAError:
                with lock:
                    result.refused_unknown += 1
            except BaseException as exc:
                note(exc)

    def admin() -> None:
        r = random.Random(seed + 7)
        while any(t.is_alive() for t in workers):
            try:
                absent = [n for n in pool if n not in mgr.loras]
                present = [n for n in mgr.loras if n != "distilled"]
                if absent and (not present or r.random() < 0.5):
                    name = r.choice(absent)
                    mgr.add_lora(LoRASpec(name, path=pool[name]))
                    result.adds += 1
                elif present:
                    mgr.remove_lora(r.choice(present))
                    result.removes += 1
            except BaseException as exc:
                note(exc)
                return
            time.sleep(0.002)  # pacing only: no result depends on it

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    keeper = threading.Thread(target=admin, daemon=True)
    keeper.start()
    for t in [*workers, keeper]:
        t.join(timeout_s)
    result.finished = not any(t.is_alive() for t in [*workers, keeper])
    if result.finished:
        mgr.synchronize()
        result.drift_checks += 1
        result.drifted += sum(not torch.equal(clean[k], v) for k, v in testing.weight_bits(mgr.managed_weights).items())
        result.cache = mgr.lora_cache_stats()
        mgr.close()
    return result


def run(requests: int = 1000, threads: int = 4, seed: int = 0, device: str = "cpu", policy: str = "auto",
        timeout_s: float = 600.0) -> SoakResult:
    before = device_bytes(device)
    result = _serve(requests, threads, seed, device, policy, timeout_s)
    result.rss_end_mib = rss_mib()
    result.device_bytes_before = before
    result.device_bytes_end = device_bytes(device)  # the DiT and the manager are dropped: back to before
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltx2_tools.lora_soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", default="auto", choices=["auto", "merge", "dynamic", "sglang"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.threads < 1:
        parser.error("--requests and --threads must be at least 1")
    result = run(args.requests, args.threads, args.seed, args.device, args.policy)
    rows = {k: v for k, v in asdict(result).items() if k != "cache"}
    for key, value in rows.items():
        print(f"{key:>20}: {value}")
    print(f"{'ok':>20}: {result.ok}")
    if args.json is not None:
        args.json.write_text(json.dumps({**asdict(result), "ok": result.ok}, indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
