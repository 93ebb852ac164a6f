"""``ltx2``: generate a video with the two-stage pipeline, or print the state diagrams.

    ltx2 generate --preset tiny                      # offline, CPU, well under two minutes
    ltx2 generate --preset full --mode snapshot      # real shapes, random weights, on a GPU
    ltx2 generate --model-path ./ltx2 --distilled-lora distilled.safetensors --lora style.safetensors@0,1
    ltx2 diagram [--mode resident]
    ltx2 perf-check --case tiny_cpu_normal_merge     # against perf_baselines.json; --list for the cases
    ltx2 bench --preset full --json bench.json       # ours against PEFT/diffusers on one model, one run

``generate`` writes the mp4 (video + audio) and a JSON report next to it: per-stage times in the
shape of sglang's perf baselines (``e2e_ms``, ``avg_denoise_ms``, ``stages_ms`` with both
LoRA-switch stages), the per-step times, the transition trace and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ltx2_residency import MergePolicyName, ResidencyError, ResidencyMode
from ltx2_residency.machine import TABLES, mermaid

from .errors import GenerationInputError
from .loras import load_lora
from .presets import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, PRESET_DEFAULTS
from .two_stage import GenerationRequest, Guidance, LTX2TwoStageHQPipeline, LTX2TwoStagePipeline

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _RichProgress:
    """One bar per stage; denoising stages advance per step."""

    def __init__(self, progress: Progress) -> None:
        self.bars = progress
        self.tasks: dict[str, Any] = {}

    def stage_started(self, stage: str, steps: int) -> None:
        self.tasks[stage] = self.bars.add_task(stage, total=steps or 1)

    def step(self, stage: str) -> None:
        self.bars.advance(self.tasks[stage])

    def stage_finished(self, stage: str, ms: float) -> None:
        task = self.tasks[stage]
        self.bars.update(task, completed=self.bars.tasks[task].total,
                         description=f"{stage} [dim]{ms:,.1f} ms[/dim]")


def _lora_arg(text: str) -> tuple[str, float, float]:
    """``PATH`` or ``PATH@S1,S2`` (strengths in stage 1 and stage 2; default 1.0 in both)."""
    path, _, strengths = text.rpartition("@") if "@" in text else (text, "", "")
    if not strengths:
        return text, 1.0, 1.0
    try:
        s1, s2 = (float(s) for s in strengths.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected PATH or PATH@S1,S2 "
                                         "(e.g. style.safetensors@0.5,1.0)") from None
    return path, s1, s2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltx2", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run the two-stage pipeline and write an mp4 + JSON report")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default=None,
                     help="tiny (offline, CPU) or full (real shapes, random weights, GPU); default tiny")
    src.add_argument("--model-path", type=Path, help="a local diffusers-format LTX-2 folder")
    gen.add_argument("--distilled-lora", type=Path, help="distilled LoRA (.safetensors, diffusers or original keys)")
    gen.add_argument("--lora", type=_lora_arg, action="append", default=[], metavar="PATH[@S1,S2]",
                     help="a further LoRA, stacked after the distilled one (repeatable)")
    gen.add_argument("--variant", choices=["normal", "hq"], default="normal",
                     help="distilled strengths: normal 0/1.0, hq 0.25/0.5")
    gen.add_argument("--mode", default="original", choices=[m.value for m in ResidencyMode] + ["auto"])
    gen.add_argument("--merge-policy", default="sglang", choices=[p.value for p in MergePolicyName])
    gen.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                     help="snapshot mode: evict the base before the stage-2 prefetch (default: below 130 GiB)")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-frames", type=int)
    gen.add_argument("--frame-rate", type=float, default=24.0)
    gen.add_argument("--steps", type=int, help="stage-1 denoising steps (stage 2 always runs 3)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-sequence-length", type=int)
    gen.add_argument("--stage1-strength", type=float, help="override the distilled LoRA's stage-1 strength")
    gen.add_argument("--stage2-strength", type=float, help="override the distilled LoRA's stage-2 strength")
    gen.add_argument("--no-guidance", action="store_true", help="stage 1 without CFG/STG/modality guidance")
    gen.add_argument("--device", default=None, help="default: cuda for --preset full, else cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    gen.add_argument("--output", type=Path, help="mp4 path (default outputs/ltx2_<preset>.mp4)")
    gen.add_argument("--report", type=Path, help="JSON report path (default: the mp4 path with .json)")
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--text-layers", type=int, default=2,
                     help="--preset full: Gemma 3 layers to build (48 is the real depth, 24 GB more)")

    dia = sub.add_parser("diagram", help="print the mermaid state diagram of each residency mode")
    dia.add_argument("--mode", choices=[m.value for m in ResidencyMode], help="only this mode")

    perf = sub.add_parser("perf-check", help="run a perf_baselines.json case; exit 1 on a regression beyond "
                          "tolerance, 2 on bad input, 3 when the case cannot run here")
    perf.add_argument("--case", help="the case to run (see --list)")
    perf.add_argument("--list", action="store_true", help="list the cases and exit")
    perf.add_argument("--baselines", type=Path, help="baselines file (default: the repository's perf_baselines.json)")
    perf.add_argument("--json", type=Path, metavar="OUT", help="write the measured metrics (the plot's input)")
    perf.add_argument("--update", action="store_true",
                      help="rewrite the case's expected numbers from this run (tolerances kept)")

    from .bench import add_arguments  # the bench module imports no heavy dependency of its own
    add_arguments(sub.add_parser("bench", help="ours against the PEFT/diffusers baselines on one model, in one "
                                 "run: switches, restore, per-step overhead, fingerprint, requests"))
    return parser


def _build(args: argparse.Namespace, progress: Any) -> LTX2TwoStagePipeline:
    cls = LTX2TwoStageHQPipeline if args.variant == "hq" else LTX2TwoStagePipeline
    loras = [load_lora(path, f"lora{i}" if i else "user", {"stage1": s1, "stage2": s2})
             for i, (path, s1, s2) in enumerate(args.lora)]
    options = dict(mode=args.mode, merge_policy=args.merge_policy, loras=loras, progress=progress)
    if args.low_vram is not None:
        options["low_vram"] = args.low_vram
    dtype = DTYPES[args.dtype]
    if args.model_path is not None:
        return cls.from_pretrained(args.model_path, distilled_lora=args.distilled_lora, dtype=dtype,
                                   device=args.device, **options)
    preset = args.preset or "tiny"
    if args.distilled_lora is not None:
        options["distilled_lora"] = args.distilled_lora
    preset_options = {"text_layers": args.text_layers} if preset == "full" else None
    device = args.device or ("cuda" if preset == "full" else None)
    return cls.from_preset(preset, seed=args.seed, device=device, dtype=dtype, preset_options=preset_options,
                           **options)


def _request(args: argparse.Namespace) -> GenerationRequest:
    strengths: dict[str, dict[str, float]] = {}
    if args.stage1_strength is not None:
        strengths["stage1"] = {"distilled": args.stage1_strength}
    if args.stage2_strength is not None:
        strengths["stage2"] = {"distilled": args.stage2_strength}
    given = dict(height=args.height, width=args.width, num_frames=args.num_frames, num_inference_steps=args.steps,
                 max_sequence_length=args.max_sequence_length or None)
    return GenerationRequest.for_preset(
        "full" if args.model_path is not None else (args.preset or "tiny"),
        prompt=args.prompt, negative_prompt=args.negative_prompt, frame_rate=args.frame_rate, seed=args.seed,
        guidance=Guidance.off() if args.no_guidance else Guidance(), strengths=strengths,
        **{k: v for k, v in given.items() if v is not None})


def _check_paths(args: argparse.Namespace) -> None:
    for flag, path in (("--model-path", args.model_path), ("--distilled-lora", args.distilled_lora),
                       *(("--lora", Path(p)) for p, _, _ in args.lora)):
        if path is not None and not Path(path).exists():
            raise GenerationInputError(f"{flag} {str(path)!r} does not exist")
    if args.preset == "full" and (args.device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        raise GenerationInputError("--preset full needs a CUDA device (19 B parameters); use --preset tiny on a CPU")


def _summary(console: Console, report: dict[str, Any], mp4: Path, json_path: Path) -> None:
    table = Table(title=f"{report['pipeline']} · mode {report['mode']} · policy {report['merge_policy']}")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    for name, ms in report["stages_ms"].items():
        table.add_row(name, f"{ms:,.1f}")
    table.add_row("[bold]e2e", f"[bold]{report['e2e_ms']:,.1f}")
    console.print(table)
    events = " → ".join(f"{r['event']}" for r in report["trace"]) or "(no weight operation)"
    console.print(f"transitions: {events}")
    console.print(f"DiT after the request: [bold]{report['dit_state_after']}[/bold]; "
                  f"avg denoise step {report['avg_denoise_ms']:,.1f} ms")
    console.print(f"wrote {mp4} and {json_path}")


def _generate(args: argparse.Namespace, console: Console) -> int:
    _check_paths(args)
    request = _request(args)
    mp4 = args.output or Path("outputs") / f"ltx2_{args.preset or ('model' if args.model_path else 'tiny')}.mp4"
    json_path = args.report or mp4.with_suffix(".json")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=False) as bars:
        pipe = _build(args, _RichProgress(bars))
        pipe.check(request)
        result = pipe(request)
    result.save_mp4(mp4)
    report = {**result.report, "output": {"mp4": str(mp4), "frames": int(result.video.shape[0]),
                                          "height": int(result.video.shape[1]), "width": int(result.video.shape[2]),
                                          "audio_sample_rate": result.audio_sample_rate}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    _summary(console, report, mp4, json_path)
    pipe.close()
    return 0


def _diagram(args: argparse.Namespace) -> int:
    for mode in ResidencyMode:
        if args.mode in (None, mode.value):
            print(f"%% {mode.value}: {TABLES[mode].summary}")
            print(mermaid(TABLES[mode]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "diagram":
            return _diagram(args)
        if args.command == "perf-check":
            from .perf import perf_check  # late: only this command needs it

            return perf_check(args, console)
        if args.command == "bench":
            from .bench import main as bench

            return bench(args)
        return _generate(args, console)
    except (GenerationInputError, ResidencyError) as exc:
        console.print(f"[bold red]error:[/bold red] {type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

