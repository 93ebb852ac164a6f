"""A scripted serving loop on the tiny LTX-2 DiT: requests in original mode under each merge
policy, with the transition trace and a bit-exact verify after every request.

Run: ``make demo`` (or ``python -m ltx2_tools.demo``). Everything is built offline.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from rich.console import Console
from rich.table import Table

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import LoRASpec, ManagerOptions, ResidencyError, ResidencyManager, testing

# (label, stage-1 override, stage-2 override, fail in stage 2?)
REQUESTS = [
    ("normal", None, None, False),
    ("HQ .25/.5", {"distilled": 0.25}, {"distilled": 0.5}, False),
    ("fails in s2", {"distilled": 0.25}, None, True),
    ("user off", None, {"user": 0.0}, False),
]


class InjectedFailure(RuntimeError):
    pass


def _moved(clean: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> int:
    return sum(int((clean[n] != now[n]).sum()) for n in clean)


def serve(console: Console, policy: str, base: torch.nn.Module, loras: list[LoRASpec]) -> int:
    model = copy.deepcopy(base)
    mgr = ResidencyManager(model, mode="original", loras=loras, merge_policy=policy,
                           options=ManagerOptions(native_ltx23=True, verify="always"))
    clean = testing.weight_bits(mgr.managed_weights)
    inputs = tiny_inputs(base)
    drift = 0
    verdicts: list[str] = []
    table = Table(title=f"merge_policy={policy!r} (native LTX-2.3 flag on)", show_lines=False)
    for col, justify in (("request", "left"), ("event", "left"), ("→ state", "left"),
                         ("ms", "right"), ("KiB", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for label, s1, s2, fail in REQUESTS:
        outcome = "ok"
        try:
            with torch.no_grad(), mgr.request() as req:
                req.enter("stage1", strengths=s1)(**inputs)
                req.enter("stage2", strengths=s2)(**inputs)
                if fail:
                    raise InjectedFailure("injected failure in stage 2")
        except InjectedFailure as exc:
            outcome = f"raised {exc.__class__.__name__}"
        records = mgr.trace.for_request(mgr.trace[-1].request_id or 0)
        moved = _moved(clean, testing.weight_bits(mgr.managed_weights))
        drift += moved
        try:
            mgr.verify_clean()
            verdict = f"{outcome}; {mgr.state.value}, verify ok, {moved} bits moved"
        except ResidencyError as exc:
            verdict = f"{outcome}; VERIFY FAILED: {exc}"
        for i, r in enumerate(records):
            table.add_row(label if i == 0 else "", r.event, r.dest,
                          f"{r.duration_ms:.2f}", f"{r.bytes_touched / 1024:,.0f}")
        if not records:
            table.add_row(label, "(none)", "clean", "", "")
        table.add_row("", f"[bold]{'✓' if moved == 0 and 'FAILED' not in verdict else '✗'} "
                      f"{mgr.state.value}[/bold]", "", "", "", end_section=True)
        verdicts.append(f"  {label}: {verdict}")
    console.print(table)
    console.print("\n".join(verdicts))
    mem = mgr.memory()
    console.print(f"  memory: managed {mem['managed_weight_bytes']:,} B, LoRA adapters "
                  f"{mem['lora_adapter_bytes']:,} B, clean host copy {mem['clean_source_host_bytes']:,} B, "
                  f"last merge patched {100 * mem['last_merge_exception_fraction']:.2f} % of elements\n")
    return drift


def peft_drift(base: torch.nn.Module, path: str, cycles: int = 4) -> int:
    """What PEFT's own merge/unmerge does to the same DiT: bits moved after ``cycles``."""
    from diffusers import LTX2VideoTransformer3DModel  # noqa: F401 - the model class in use

    model = copy.deepcopy(base)
    model.load_lora_adapter(path, adapter_name="distilled", prefix="transformer")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = testing.weight_bits({str(i): m.get_base_layer().weight for i, m in enumerate(layers)})
    with torch.no_grad():
        for _ in range(cycles):
            for m in layers:
                m.merge(adapter_names=["distilled"])
            for m in layers:
                m.unmerge()
    after = testing.weight_bits({str(i): m.get_base_layer().weight for i, m in enumerate(layers)})
    return _moved(before, after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", nargs="+", default=["sglang", "dynamic", "merge"])
    args = parser.parse_args(argv)
    console = Console()
    start = time.perf_counter()
    base = tiny_transformer(seed=0)
    targets = testing.linear_names(base)
    with tempfile.TemporaryDirectory() as tmp:
        distilled = testing.save_lora(Path(tmp) / "distilled.safetensors",
                              testing.synthetic_lora(base, targets, rank=8, relative_norm=0.10, seed=1))
        attn = [n for n in targets if ".attn1." in n]
        user = testing.save_lora(Path(tmp) / "user.safetensors",
                         testing.synthetic_lora(base, attn, rank=4, relative_norm=0.15, seed=2))
        loras = [LoRASpec("distilled", distilled, {"stage1": 0.0, "stage2": 1.0}),
                 LoRASpec("user", user, {"stage1": 1.0, "stage2": 1.0})]
        console.print(f"[bold]tiny LTX-2 DiT[/bold]: {sum(p.numel() for p in base.parameters()):,} "
                      f"params, LoRAs on {len(targets)} block linears (|dW| = 10 % of |W|)\n")
        drift = {p: serve(console, p, base, loras) for p in args.policies}
        peft = peft_drift(base, distilled)
    console.print(f"PEFT merge/unmerge x4 on the same DiT: [red]{peft:,} weight elements moved[/red]; "
                  f"ours: " + ", ".join(f"{p} {d}" for p, d in drift.items()) + " elements moved")
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if all(d == 0 for d in drift.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
