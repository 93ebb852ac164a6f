"""``ltx2``: generate a video with the two-stage pipeline, or print the state diagrams.

    ltx2 generate --preset tiny                      # offline, CPU, well under two minutes
    ltx2 generate --preset full --mode snapshot      # real shapes, random weights, on a GPU
    ltx2 generate --preset full --compile            # the DiT under torch.compile (inductor)
    ltx2 generate --model-path ./ltx2 --distilled-lora distilled.safetensors --lora style.safetensors@0,1
    torchrun --nproc-per-node 2 -m ltx2_pipeline.cli generate --preset tiny --cfg-parallel   # two ranks
    torchrun --nproc-per-node 2 -m ltx2_pipeline.cli generate --preset tiny --context-parallel ulysses
    ltx2 diagram [--mode resident]
    ltx2 perf-check --case tiny_cpu_normal_merge     # against perf_baselines.json; --list for the cases
    ltx2 bench --preset full --json bench.json       # ours against PEFT/diffusers on one model, one run

``generate`` writes the mp4 (video + audio) and a JSON report next to it: per-stage times in the
shape of sglang's perf baselines (``e2e_ms``, ``avg_denoise_ms``, ``stages_ms`` with both
LoRA-switch stages), the per-step times, the transition trace, peak memory and, with
``--compile``, the graphs the request compiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ltx2_residency import (
    TABLES,
    CompileSpec,
    LoRASpec,
    ManagerOptions,
    MergePolicyName,
    ResidencyError,
    ResidencyMode,
    mermaid,
)

from . import checks
from .compiling import add_compile_arguments, compile_arguments
from .context_parallel import KINDS
from .errors import GenerationInputError, NonFiniteOutputError, STGSkippedWarning
from .loras import VARIANT_STRENGTHS, check_strength, load_lora
from .parallel import Ranks, from_torchrun, torchrun_local_rank, torchrun_world_size
from .presets import (
    GEMMA3_12B_LAYERS,
    PRESET_DEFAULTS,
    check_model_folder,
    full_preset_bytes,
    vae_compression,
)
from .two_stage import (
    STAGE2_SIGMAS,
    GenerationRequest,
    Guidance,
    LTX2TwoStageHQPipeline,
    LTX2TwoStagePipeline,
    check_request,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


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
    """``PATH`` or ``PATH@S1,S2`` (strengths in stage 1 and stage 2; default 1.0 in both). Split at
    the last ``@``, and only when what follows it is two numbers: any other ``@`` belongs to the path."""
    path, at, suffix = text.rpartition("@")
    parts = suffix.split(",")
    if not (at and path and len(parts) == 2):
        return text, 1.0, 1.0
    try:
        s1, s2 = (float(s) for s in parts)
    except ValueError:
        return text, 1.0, 1.0
    for phase, value in (("stage 1", s1), ("stage 2", s2)):
        try:
            check_strength(value, f"{text!r} {phase}")
        except ResidencyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return path, s1, s2


def _strength_arg(text: str) -> float:
    try:
        return check_strength(float(text), "")
    except ValueError as exc:  # StrengthError is a ValueError too
        raise argparse.ArgumentTypeError(str(exc).removeprefix(": ") if isinstance(exc, ResidencyError)
                                         else f"expected a number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ltx2", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run the two-stage pipeline and write an mp4 + JSON report")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default=None,
                     help="tiny (offline, CPU) or full (real shapes, random weights, GPU); default tiny")
    src.add_argument("--model-path", type=Path, help="a local diffusers-format LTX-2 folder")
    gen.add_argument("--distilled-lora", type=Path, help="distilled LoRA (.safetensors, diffusers or original keys)")
    gen.add_argument("--lora", type=_lora_arg, action="append", default=[], metavar="PATH[@S1,S2]",
                     help="a further LoRA, stacked after the distilled one (repeatable); S1,S2 after the last '@' "
                     "are its strengths in stage 1 and 2 (default 1,1)")
    gen.add_argument("--variant", choices=["normal", "hq"], default="normal",
                     help="distilled strengths: normal 0/1.0, hq 0.25/0.5")
    gen.add_argument("--mode", default="original", choices=[m.value for m in ResidencyMode] + ["auto"])
    gen.add_argument("--merge-policy", default="sglang", choices=[p.value for p in MergePolicyName])
    gen.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                     help="--mode snapshot only: evict the base before the stage-2 prefetch (default: below 130 GiB)")
    gen.add_argument("--prompt", help="default: a robot dancing in the rain")
    gen.add_argument("--negative-prompt", help="stage 1's guidance only (refused with --no-guidance)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-frames", type=int)
    gen.add_argument("--frame-rate", type=checks.positive_float, default=24.0)
    gen.add_argument("--steps", type=checks.positive_int,
                     help=f"stage-1 denoising steps (stage 2 always runs {len(STAGE2_SIGMAS)})")
    gen.add_argument("--seed", type=checks.seed, default=0)
    gen.add_argument("--max-sequence-length", type=checks.positive_int, help="text tokens per prompt")
    gen.add_argument("--stage1-strength", type=_strength_arg, help="override the distilled LoRA's stage-1 strength")
    gen.add_argument("--stage2-strength", type=_strength_arg, help="override the distilled LoRA's stage-2 strength")
    gen.add_argument("--no-guidance", action="store_true", help="stage 1 without CFG/STG/modality guidance")
    gen.add_argument("--device", type=checks.device, default=None, help="default: cuda for --preset full, else cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    add_compile_arguments(gen)
    gen.add_argument("--output", type=Path,
                     help="mp4 path, in an existing directory (default outputs/ltx2_<preset>.mp4)")
    gen.add_argument("--report", type=Path, help="JSON report path (default: the mp4 path with .json)")
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--cfg-parallel", action="store_true",
                     help="under torchrun with 2 processes: stage 1's two guidance branches on the two ranks")
    gen.add_argument("--context-parallel", choices=KINDS, default=None,
                     help="under torchrun: every DiT call's sequences split across the ranks (diffusers' Ulysses "
                     "or ring attention)")
    gen.add_argument("--text-layers", type=checks.positive_int, default=None,
                     help=f"--preset full only: Gemma 3 layers to build (default 2; {GEMMA3_12B_LAYERS} is the real "
                     "depth, 24 GB more)")

    dia = sub.add_parser("diagram", help="print the mermaid state diagram of each residency mode")
    dia.add_argument("--mode", choices=[m.value for m in ResidencyMode], help="only this mode")

    for name, (module, help_text) in TOOL_COMMANDS.items():
        tool = importlib.import_module(module)  # light: a tool imports its heavy dependencies when it runs
        tool.add_arguments(sub.add_parser(name, help=help_text, description=tool.DESCRIPTION))
    return parser


#: Commands the tools package provides (``ltx2_tools``): name -> (module, help). Each module has
#: ``DESCRIPTION``, ``add_arguments(parser)`` and ``command(args, console) -> exit status``; the product
#: names them here and imports none of them statically.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "perf-check": ("ltx2_tools.perf", "run a perf_baselines.json case; exit 1 on a regression beyond tolerance, 2 "
                   "on bad input, 3 when the case cannot run here"),
    "bench": ("ltx2_tools.bench", "ours against the PEFT/diffusers baselines on one model, in one run: switches, "
              "restore, per-step overhead, fingerprint, requests"),
}


@dataclass(frozen=True)
class _Plan:
    """A ``generate`` run, every argument checked: nothing is built before this exists."""

    preset: str | None  # None: --model-path
    device: torch.device
    request: GenerationRequest
    mp4: Path
    report: Path
    distilled: LoRASpec | None  # None: the preset's, or the model folder's file
    loras: list[LoRASpec]
    compile: CompileSpec | None  # None: the DiT runs eager


def _plan(args: argparse.Namespace) -> _Plan:
    """Check every ``generate`` argument against the others and this machine, before anything loads."""
    preset = None if args.model_path is not None else (args.preset or "tiny")
    _check_applicable(args, preset)
    compile_spec = compile_arguments(args)
    if preset == "full" and args.device is None and not torch.cuda.is_available():
        raise GenerationInputError("--preset full runs on a CUDA device and there is none here; use --preset tiny, "
                                   "or --device cpu on a host with the memory")
    device = args.device or torch.device("cuda" if preset == "full" else "cpu")
    if torchrun_world_size() > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torchrun_local_rank())  # one GPU per rank
    checks.check_device(device)
    if args.context_parallel == "ring" and device.type == "cpu":
        raise GenerationInputError("--context-parallel ring merges partial attention by its log-sum-exp, which no "
                                   "attention of diffusers returns on a CPU: use --context-parallel ulysses")
    if args.model_path is not None:
        check_model_folder(args.model_path)
    for flag, path in (("--distilled-lora", args.distilled_lora), *(("--lora", Path(p)) for p, _, _ in args.lora)):
        if path is not None and not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            hint = (" (strengths go after the last '@' as S1,S2, e.g. style.safetensors@0.5,1.0)"
                    if flag == "--lora" and "@" in str(path) else "")
            raise GenerationInputError(f"{flag} {str(path)!r} {what}{hint}")
    mp4 = args.output or Path("outputs") / f"ltx2_{preset or 'model'}.mp4"
    report = args.report or mp4.with_suffix(".json")
    # the default folder is ours to make (when the run writes); a folder the user names must exist
    checks.check_output_path("--output", mp4, checks.VIDEO_SUFFIXES, missing_ok=args.output is None)
    checks.check_output_path("--report", report, missing_ok=args.report is None and args.output is None)
    if report.resolve() == mp4.resolve():
        raise GenerationInputError(f"--report {str(report)!r} is the video's own path; give the report another name")
    request = _request(args, preset)
    names = [f"lora{i}" if i else "user" for i in range(len(args.lora))]
    check_request(request, *vae_compression(preset, args.model_path), ["distilled", *names])
    if preset == "full":
        _check_full_preset_fits(args, device)
    # read (and checked against their format) here: a bad file is bad input, found before any model loads
    distilled = (load_lora(args.distilled_lora, "distilled", VARIANT_STRENGTHS[args.variant])
                 if args.distilled_lora is not None else None)
    loras = [load_lora(path, name, {"stage1": s1, "stage2": s2})
             for name, (path, s1, s2) in zip(names, args.lora, strict=True)]
    return _Plan(preset, device, request, mp4, report, distilled, loras, compile_spec)


def _check_applicable(args: argparse.Namespace, preset: str | None) -> None:
    """Refuse a flag that would change nothing in this combination instead of ignoring it."""
    if args.low_vram is not None and args.mode != "snapshot":
        flag = "--low-vram" if args.low_vram else "--no-low-vram"
        raise GenerationInputError(f"{flag} applies to --mode snapshot only (the mode that evicts the base before "
                                   f"its stage-2 prefetch), not to --mode {args.mode}; drop it")
    if args.text_layers is not None:
        if preset != "full":
            where = "--preset tiny" if preset == "tiny" else "--model-path (the folder's text encoder has its depth)"
            raise GenerationInputError(f"--text-layers applies to --preset full only, not to {where}; drop it")
        if args.text_layers > GEMMA3_12B_LAYERS:
            raise GenerationInputError(f"--text-layers {args.text_layers}: Gemma 3 12B has {GEMMA3_12B_LAYERS} "
                                       f"layers; use 1 to {GEMMA3_12B_LAYERS}")
    if args.cfg_parallel:
        ranks = torchrun_world_size()
        if ranks != 2:
            where = "without torchrun" if ranks == 1 else f"with {ranks} processes"
            raise GenerationInputError(f"--cfg-parallel puts stage 1's two guidance branches on two ranks; this run is "
                                       f"{where}: run it as torchrun --nproc-per-node 2 -m ltx2_pipeline.cli generate")
        if args.no_guidance:
            raise GenerationInputError("--cfg-parallel splits stage 1's guidance, which --no-guidance turns off; "
                                       "drop one of them")
    if args.context_parallel is not None:
        ranks = torchrun_world_size()
        if ranks < 2:
            raise GenerationInputError(f"--context-parallel {args.context_parallel} splits every DiT call across "
                                       "ranks; this run is without torchrun: run it as torchrun --nproc-per-node 2 "
                                       "-m ltx2_pipeline.cli generate")
        if args.cfg_parallel:
            raise GenerationInputError("--cfg-parallel and --context-parallel both split the ranks; choose one")
        if args.compile is not None:
            raise GenerationInputError("--context-parallel runs an eager DiT; drop --compile")
    if args.negative_prompt is not None and args.no_guidance:
        raise GenerationInputError("--negative-prompt applies to stage 1's guidance, which --no-guidance turns off; "
                                   "drop one of them")


def _check_full_preset_fits(args: argparse.Namespace, device: torch.device) -> None:
    """The full preset's weights (from diffusers' real configs), its LoRAs and a second DiT where the
    mode keeps one, against the memory the device has free: a lower bound, activations come on top."""
    dtype = DTYPES[args.dtype]
    held = full_preset_bytes(dtype, args.text_layers or 2)
    params = sum(v for k, v in held.items() if k != "distilled_lora") // dtype.itemsize
    lora = args.distilled_lora.stat().st_size if args.distilled_lora is not None else held["distilled_lora"]
    lora += sum(Path(p).stat().st_size for p, _, _ in args.lora)
    need = sum(v for k, v in held.items() if k != "distilled_lora") + lora
    parts = [f"{params / 1e9:.1f} B parameters in {args.dtype}", f"LoRAs {lora / checks.GIB:.1f} GiB"]
    if args.mode == "resident" or (args.mode == "snapshot" and not args.low_vram):
        need += held["transformer"]
        parts.append(f"a second DiT for --mode {args.mode} {held['transformer'] / checks.GIB:.1f} GiB")
    checks.check_fits("--preset full", need, device, " + ".join(parts),
                      "use --preset tiny, or a device with more memory" +
                      ("" if args.mode == "original" else ", or --mode original"))


def _build(args: argparse.Namespace, plan: _Plan, progress: Any, ranks: Ranks | None) -> LTX2TwoStagePipeline:
    cls = LTX2TwoStageHQPipeline if args.variant == "hq" else LTX2TwoStagePipeline
    options: dict[str, Any] = dict(mode=args.mode, merge_policy=args.merge_policy, loras=plan.loras,
                                   progress=progress, options=ManagerOptions(low_vram=args.low_vram),
                                   compile=plan.compile, process_group=ranks and ranks.group,
                                   cfg_parallel=args.cfg_parallel, context_parallel=args.context_parallel)
    dtype = DTYPES[args.dtype]
    if plan.preset is None:
        return cls.from_pretrained(args.model_path, distilled_lora=plan.distilled, dtype=dtype,
                                   device=args.device, **options)
    if plan.distilled is not None:
        options["distilled_lora"] = plan.distilled
    preset_options = {"text_layers": args.text_layers} if args.text_layers is not None else None
    device = plan.device if plan.preset == "full" or args.device is not None else None
    return cls.from_preset(plan.preset, seed=args.seed, device=device, dtype=dtype, preset_options=preset_options,
                           **options)


def _request(args: argparse.Namespace, preset: str | None) -> GenerationRequest:
    strengths: dict[str, dict[str, float]] = {}
    if args.stage1_strength is not None:
        strengths["stage1"] = {"distilled": args.stage1_strength}
    if args.stage2_strength is not None:
        strengths["stage2"] = {"distilled": args.stage2_strength}
    given = dict(height=args.height, width=args.width, num_frames=args.num_frames, num_inference_steps=args.steps,
                 max_sequence_length=args.max_sequence_length, prompt=args.prompt,
                 negative_prompt=args.negative_prompt)
    return GenerationRequest.for_preset(
        preset or "full", frame_rate=args.frame_rate, seed=args.seed,
        guidance=Guidance.off() if args.no_guidance else Guidance(), strengths=strengths,
        **{k: v for k, v in given.items() if v is not None})


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (a CUDA error spans several)."""
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)


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
    if report.get("compile"):
        spec = report["compile"]
        console.print(f"DiT compiled (mode {spec['mode']}, backend {spec['backend']}): {report['graphs_compiled']} "
                      f"graphs compiled in this request, {report['compile_ms'] / 1e3:,.1f} s of its e2e "
                      "(a later request at the same shapes compiles none)")
    console.print(f"wrote {mp4} and {json_path}")


def _generate(args: argparse.Namespace, console: Console) -> int:
    plan = _plan(args)
    if torchrun_world_size() == 1:
        return _generate_planned(args, console, plan, None)
    # under torchrun: one pipeline per rank, the managers in lock-step; rank 0 writes and reports
    with from_torchrun(plan.device) as ranks:
        if not ranks.leader:
            args.no_progress = True
            console = Console(stderr=True, quiet=True)
        return _generate_planned(args, console, plan, ranks)


def _generate_planned(args: argparse.Namespace, console: Console, plan: _Plan, ranks: Ranks | None) -> int:
    req = plan.request
    leader = ranks is None or ranks.leader
    # on stdout, once every argument is checked: stderr carries the progress and nothing but one line per error
    compiled = "" if plan.compile is None else f", DiT compiled ({plan.compile.mode}, {plan.compile.backend})"
    on = f"{plan.device}" if ranks is None else f"{ranks.size} ranks ({plan.device.type})"
    if leader:
        print(f"ltx2 generate: {plan.preset or args.model_path} on {on}, {req.width}x{req.height}, "
              f"{req.num_frames} frames, {req.num_inference_steps} + {len(STAGE2_SIGMAS)} steps{compiled} -> "
              f"{plan.mp4}", flush=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pipe: LTX2TwoStagePipeline | None = None
    try:
        with Progress(*columns, console=console, disable=args.no_progress, transient=False) as bars:
            pipe = _build(args, plan, _RichProgress(bars), ranks)
            pipe.check(req)
            with warnings.catch_warnings():
                # one line, not Python's warning with a hint written for library callers
                warnings.simplefilter("ignore", STGSkippedWarning)
                result = pipe(req)
            if result.report["stage1_guidance"]["stg_skipped"] and leader:
                print("note: stage 1 ran without STG: this DiT has no perturbed attention (as LTX-2.0's), so "
                      "the STG pass would repeat the conditional one", file=sys.stderr, flush=True)
    except NonFiniteOutputError as exc:
        if leader:
            _write_report(plan.report, {**(exc.report or {}), "output": None})
            _error(f"{type(exc).__name__}: {exc} (the report is in {plan.report}; no video written)")
        return 1
    finally:
        if pipe is not None:
            pipe.close()
    if not leader:
        return 0
    result.save_mp4(plan.mp4)
    report = {**result.report, "output": {"mp4": str(plan.mp4), "frames": int(result.video.shape[0]),
                                          "height": int(result.video.shape[1]), "width": int(result.video.shape[2]),
                                          "audio_sample_rate": result.audio_sample_rate}}
    _write_report(plan.report, report)
    _summary(console, report, plan.mp4, plan.report)
    return 0


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _diagram(args: argparse.Namespace) -> int:
    for mode in ResidencyMode:
        if args.mode in (None, mode.value):
            print(f"%% {mode.value}: {TABLES[mode].summary}")
            print(mermaid(TABLES[mode]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (argparse's convention: before any work), 1 when a run
    fails, 130 on Ctrl-C; every error is one line on stderr."""
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "diagram":
            return _diagram(args)
        if args.command in TOOL_COMMANDS:
            return int(importlib.import_module(TOOL_COMMANDS[args.command][0]).command(args, console))
        return _generate(args, console)
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except (GenerationInputError, ResidencyError) as exc:
        _error(f"{type(exc).__name__}: {exc}")
        # bad input is a ValueError (ConfigError, LoRAValidationError, ...); the rest failed at run time
        return 2 if isinstance(exc, ValueError) else 1
    except (torch.OutOfMemoryError, MemoryError) as exc:
        _error(f"out of memory: {exc or type(exc).__name__}; try a smaller size, fewer frames or --preset tiny")
        return 1
    except OSError as exc:  # e.g. the disk filled up while writing the outputs
        _error(f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

