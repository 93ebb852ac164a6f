"""A PNG of where a two-stage request's time goes, from bench JSON:

    python -m ltx2_tools.plot BENCH.json [MORE.json ...] OUT.png [--title TEXT]

Left: one stacked horizontal bar per case, its ``stages_ms`` in pipeline order, the LoRA switch and
restore stages in strong colours, e2e annotated. Right: the weight-management stages alone (on
the left they are often a sliver). Input: anything holding results with ``stages_ms`` and
``e2e_ms`` — ``ltx2 perf-check --json`` output (``{case: result}``), a list of
:func:`ltx2_tools.perf.run_case` results, an ``ltx2 generate`` report, several files merged;
other keys are ignored, so the bench schema can grow without breaking the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .perf import WEIGHT_STAGE_PREFIX

#: Highlighted stages, in the order they run; any other ``LTX2LoRA*`` stage gets the last colour.
WEIGHT_COLOURS = {"LTX2LoRASwitchStage_stage1": "#d62728", "LTX2LoRASwitchStage_stage2": "#ff7f0e",
                  "LTX2LoRARestoreStage": "#9467bd", "LTX2LoRARestoreWaitStage": "#e377c2"}
OTHER_WEIGHT_COLOUR = "#8c564b"
#: The rest in muted blues and greys: they are context, the weight stages are the story.
MUTED = ("#aec7e8", "#5b8db8", "#c7c7c7", "#9ecae1", "#8c8c8c", "#dbdb8d", "#98df8a", "#c5b0d5")


def _is_result(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("stages_ms"), dict) and \
        isinstance(node.get("e2e_ms"), (int, float))


def _label(result: dict[str, Any], hint: str | None) -> str:
    if isinstance(result.get("case"), str):
        return result["case"]
    if hint:
        return hint
    parts = [result.get(k) for k in ("pipeline", "variant", "mode", "merge_policy")]
    return " ".join(str(p) for p in parts if p) or "result"


def _walk(node: Any, hint: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every result in ``node`` (depth first, in order): a result is not searched further."""
    if _is_result(node):
        yield _label(node, hint), node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, str(key))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, hint)


def load_results(*sources: str | Path | Any) -> dict[str, dict[str, Any]]:
    """Case label -> result from files (or already-parsed JSON); a repeated label gets a suffix."""
    out: dict[str, dict[str, Any]] = {}
    for source in sources:
        data = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
        for label, result in _walk(data):
            name, n = label, 2
            while name in out:
                name, n = f"{label} ({n})", n + 1
            out[name] = result
    return out


def _stage_order(results: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for result in results.values():  # first-seen order: the pipeline's own
        order += [s for s in result["stages_ms"] if s not in order]
    return order


def plot(results: dict[str, dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Draw ``results`` (see :func:`load_results`) into the PNG ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'matplotlib>=3.8'") from None
    matplotlib.use("Agg")  # files only: no display on CI or the device machine
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot: expected objects with 'stages_ms' and 'e2e_ms'")
    names = list(results)
    stages = _stage_order(results)
    weight = [s for s in stages if s.startswith(WEIGHT_STAGE_PREFIX)]
    colours, muted = {}, iter(MUTED * (len(stages) // len(MUTED) + 1))
    for s in stages:
        colours[s] = WEIGHT_COLOURS.get(s, OTHER_WEIGHT_COLOUR) if s in weight else next(muted)
    fig, (ax, wax) = plt.subplots(1, 2, figsize=(14, 1.2 + 0.7 * len(names)), width_ratios=(3, 1),
                                  layout="constrained")
    y = list(range(len(names)))[::-1]  # the first case on top
    for axis, drawn in ((ax, stages), (wax, weight)):
        left = [0.0] * len(names)
        for s in drawn:
            widths = [float(results[n]["stages_ms"].get(s) or 0.0) for n in names]
            axis.barh(y, widths, left=left, color=colours[s], edgecolor="black" if s in weight else "white",
                      linewidth=0.6, hatch="//" if s in weight else None, label=s)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        axis.set_yticks(y, names if axis is ax else [""] * len(names))
        axis.set_xlabel("ms")
        axis.grid(axis="x", alpha=0.3)
    for yi, n in zip(y, names, strict=True):
        r = results[n]
        total = sum(float(v or 0.0) for v in r["stages_ms"].values())
        wm = sum(float(r["stages_ms"].get(s) or 0.0) for s in weight)
        # e2e also holds the gaps between stages: annotate it, do not draw it as a stage
        ax.text(max(total, r["e2e_ms"]), yi, f"  e2e {r['e2e_ms']:,.1f} ms · weights {wm:,.1f} ms "
                f"({wm / r['e2e_ms']:.1%})" if r["e2e_ms"] else "", va="center", fontsize=8)
        wax.text(wm, yi, f" {wm:,.2f}", va="center", fontsize=8)
    # room right of the longest bar for its annotation
    ax.set_xlim(0, 1.6 * max(max(r["e2e_ms"], sum(float(v or 0.0) for v in r["stages_ms"].values()))
                             for r in results.values()))
    wax.margins(x=0.25)
    ax.set_title(title or "LTX-2 two-stage request: time per stage (median over timed requests)")
    wax.set_title("weight management\n(LoRA switches + restore)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltx2_tools.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="BENCH.json ... OUT.png")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("expected at least one bench JSON and the output PNG")
    *inputs, out = args.paths
    try:
        results = load_results(*inputs)
        written = plot(results, out, args.title)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({len(results)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
