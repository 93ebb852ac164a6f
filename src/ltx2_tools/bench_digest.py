"""Time ``verify_clean()``'s fingerprint at the real LTX-2 shapes, without diffusers.

The DiT's 1344 block linears (diffusers' default ``LTX2VideoTransformer3DModel``: 48 blocks of
the linears in ``costmodel.LTX2_BLOCK_LINEARS``, 34.5 GiB in bf16) as plain ``nn.Linear``
modules with N(0, 0.02) weights, a rank-8 LoRA on all of them and an ``original``-mode manager
over them: the cost of a fingerprint depends on the shapes, not the values. Prints one JSON
object: ``verify_clean()`` (median and best of ``--repeats``), the fingerprint alone
(``FingerprintPlan.compute()`` and its compare), half of an in-place ``mul_(1)`` pass over the
weights (a read floor), and with ``--tiles`` the fingerprint under other kernel tilings.

    python -m ltx2_tools.bench_digest
    python -m ltx2_tools.bench_digest --tiles 32768,4,1024,4 131072,4,1024,8 --torch
    python -m ltx2_tools.bench_digest --device cpu --scale 0.03125 --repeats 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ltx2_residency import (
    LTX2_BLOCK_LINEARS,
    LTX2_BLOCKS,
    Fingerprint,
    FingerprintPlan,
    LoRASpec,
    ManagerOptions,
    ResidencyManager,
    testing,
)


def block_linears(device: str | torch.device = "cuda", scale: float = 1.0, seed: int = 0) -> nn.Module:
    """``transformer_blocks.{i}.<name>`` Linear modules (no bias) at LTX-2's shapes times ``scale``."""
    root = nn.Module()
    root.transformer_blocks = nn.ModuleList(nn.Module() for _ in range(LTX2_BLOCKS))
    gen = torch.Generator(device=device).manual_seed(seed)
    for block in root.transformer_blocks:
        for name, out_f, in_f in LTX2_BLOCK_LINEARS:
            *path, leaf = name.split(".")
            parent = block
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            with torch.device("meta"):
                lin = nn.Linear(max(1, round(in_f * scale)), max(1, round(out_f * scale)), bias=False,
                                dtype=torch.bfloat16)
            lin = lin.to_empty(device=device).requires_grad_(False)
            with torch.no_grad():
                lin.weight.normal_(0.0, 0.02, generator=gen)
            parent.add_module(leaf, lin)
    return root


def _timed(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run(device: str, scale: float, repeats: int, tiles: Sequence[str], torch_path: bool) -> dict[str, object]:
    cuda = torch.device(device).type == "cuda"
    model = block_linears(device, scale)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lora = testing.synthetic_lora(model, targets, rank=8, relative_norm=0.10)
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", tensors=lora, strengths={"stage1": 0.0,
                                                                                        "stage2": 1.0})],
                           merge_policy="merge", options=ManagerOptions(clean_source=None))
    weights = mgr.managed_weights
    res: dict[str, object] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "scale": scale, "layers": len(weights),
        "weight_gib": sum(w.numel() * w.element_size() for w in weights.values()) / 2**30,
    }
    mgr.verify_clean()  # compiles the kernel and builds the plan's tables
    runs = [_timed(mgr.verify_clean, cuda) for _ in range(repeats)]
    res["verify_clean_ms"], res["verify_clean_best_ms"] = statistics.median(runs), min(runs)
    plan = FingerprintPlan(weights)
    clean = plan.compute()
    runs = [_timed(lambda: clean.differing(plan.compute()), cuda) for _ in range(repeats)]
    res["fingerprint_ms"] = statistics.median(runs)
    res["tiles"] = {}
    for cfg in tiles:
        os.environ["LTX2_DIGEST_TILES"] = cfg
        try:
            tiled = FingerprintPlan(weights)
            assert tiled.compute().differing(clean) == [], "a tiling changed the digest"
            res["tiles"][cfg] = statistics.median(  # type: ignore[index]
                _timed(lambda t=tiled: clean.differing(t.compute()), cuda) for _ in range(repeats))
        finally:
            del os.environ["LTX2_DIGEST_TILES"]

    def floor() -> None:
        with torch.no_grad():
            for w in weights.values():
                w.mul_(1)
    floor()
    res["read_floor_ms"] = statistics.median(_timed(floor, cuda) for _ in range(3)) / 2
    if torch_path:
        res["torch_path_ms"] = _timed(lambda: Fingerprint.of(weights.items(), use_kernel=False), cuda)
    mgr.verify_clean()
    mgr.close()
    return res


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="every layer dimension times this (default 1: real)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiles", nargs="*", default=[], help="LTX2_DIGEST_TILES values to time as well")
    ap.add_argument("--torch", action="store_true", help="also time the torch path once")
    args = ap.parse_args(argv)
    if args.repeats < 1 or not 0 < args.scale <= 1:
        ap.error("--repeats must be >= 1 and --scale in (0, 1]")
    print(json.dumps(run(args.device, args.scale, args.repeats, args.tiles, args.torch), indent=1))


if __name__ == "__main__":
    main()
