"""Residency-mode measurements at real LTX-2 shapes on a GPU, side by side in one process:

- the pinned host-to-device bandwidth of this machine (the ceiling);
- snapshot mode: the stage-2 prefetch's achieved bandwidth, and the stall at the stage-2
  switch when the prefetch started one stage early (stage 1 simulated by device work lasting
  about as long as the transfer);
- resident mode (when two DiTs fit): the stage-2 switch latency;
- peak device memory per mode against the manager's own expectation.

    python -m ltx2_tools.bench_modes --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from ltx2_residency import LoRASpec, ManagerOptions, ResidencyManager, testing

from .bench_switch import report
from .realshape import real_shape_transformer

GIB = 2**30


def pinned_h2d_gibps(nbytes: int = GIB) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return nbytes / GIB / statistics.median(times)


def _manager(mode: str, **kw) -> ResidencyManager:
    model = real_shape_transformer("cuda")
    tensors = testing.synthetic_lora(model, testing.linear_names(model), rank=384, relative_norm=0.10)
    spec = LoRASpec("distilled", tensors=tensors, strengths={"stage1": 0.0, "stage2": 1.0})
    return ResidencyManager(model, mode=mode, loras=[spec], merge_policy="dynamic",
                            options=ManagerOptions(strict=False, clean_source=None, **kw))


def _busy(ms: float) -> None:
    """Device work standing in for stage 1's denoising steps, about ``ms`` long."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    while (time.perf_counter() - t) * 1e3 < ms:
        a = a @ a
        a = a / a.norm()
        torch.cuda.synchronize()


def _cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)
    if host_empty is not None:
        host_empty()  # pinned snapshots sit in the host caching allocator otherwise


def snapshot_case(low_vram: bool, h2d: float, requests: int = 3) -> dict:
    mgr = _manager("snapshot", low_vram=low_vram)
    torch.cuda.reset_peak_memory_stats()  # requests only, not the build
    dit_bytes = mgr.memory()["stage2_host_snapshot_bytes"]  # the stage-2 DiT, pinned on the host
    transfer_ms = dit_bytes / GIB / h2d * 1e3
    out: dict = {"low_vram": low_vram, "dit_gib": dit_bytes / GIB, "transfer_ms_at_pinned_bw": transfer_ms}
    switch, bw = [], []
    for _ in range(requests):
        with torch.no_grad(), mgr.request() as req:
            req.enter("stage1")
            if not low_vram:
                _busy(transfer_ms * 1.1)  # stage 1 runs while stage 2's DiT streams in
            torch.cuda.synchronize()
            t = time.perf_counter()
            req.enter("stage2")
            torch.cuda.synchronize()
            switch.append((time.perf_counter() - t) * 1e3)
        if low_vram:
            bw.append(dit_bytes / GIB / (switch[-1] / 1e3))
    out["stage2_switch_ms"] = statistics.median(switch)
    if low_vram:
        out["prefetch_gibps"] = statistics.median(bw)
        out["prefetch_fraction_of_pinned_bw"] = out["prefetch_gibps"] / h2d
    else:
        out["stall_fraction_of_transfer"] = out["stage2_switch_ms"] / transfer_ms
    out["peak_device_gib"] = torch.cuda.max_memory_allocated() / GIB
    out["expected_peak_device_gib"] = mgr.memory()["expected_peak_device_bytes"] / GIB
    mgr.close()
    return out


def resident_case(requests: int = 20) -> dict:
    mgr = _manager("resident")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(requests):
        with torch.no_grad(), mgr.request() as req:
            req.enter("stage1")
            t = time.perf_counter()
            req.enter("stage2")
            times.append((time.perf_counter() - t) * 1e3)
    trace = [r.duration_ms for r in mgr.trace if r.event == "activate_stage2"]
    out = {"stage2_switch_ms": statistics.median(times), "activate_event_ms": statistics.median(trace),
           "peak_device_gib": torch.cuda.max_memory_allocated() / GIB,
           "expected_peak_device_gib": mgr.memory()["expected_peak_device_bytes"] / GIB}
    mgr.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cases", nargs="+", default=["resident", "snapshot", "snapshot_low_vram"])
    args = ap.parse_args(argv)
    total = torch.cuda.get_device_properties(0).total_memory
    res: dict = {"device": torch.cuda.get_device_name(0), "device_gib": total / GIB, "torch": torch.__version__}
    res["pinned_h2d_gibps"] = pinned_h2d_gibps()
    for case in args.cases:
        try:
            if case == "snapshot_low_vram":
                res[case] = snapshot_case(True, res["pinned_h2d_gibps"])
            elif case == "snapshot":
                res[case] = snapshot_case(False, res["pinned_h2d_gibps"])
            elif case == "resident":
                res[case] = resident_case()
        except Exception as exc:  # report what did not fit instead of losing the other cases
            res[case] = {"error": repr(exc)[:300]}
        _cleanup()  # the case's manager is unreachable now: free its device and pinned memory
        print(case, json.dumps(res[case]), flush=True)
    report(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
