"""The cost model behind ``merge_policy="auto"``: merge a phase's LoRAs in place, or run them dynamic.

MERGED pays once per phase (the fused merge, and the part of its undo the request waits for);
DYNAMIC pays every forward: with PEFT's forward, ``result + lora_B(lora_A(x)) * scaling`` at each
adapted layer; with ours (``ops.forward``), the cheaper per layer of the factored form and a
transient merged weight. Estimates are rooflines from :class:`DeviceRates`, calibrated at each
constant; times the manager measured (:meth:`CostModel.observe_merge` /
:meth:`CostModel.observe_undo`) replace them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .domain import ApplyKind, Phase
from .errors import ConfigError

#: One exact-undo record: an int32 flat index and the int16 original bf16 bits (ops/fused).
RECORD_BYTES = 6
#: Records reserved per adapted element: a LoRA's first merge reserves ops/fused.FIRST_GUESS
#: (12.5 %), and that must fit; fewer are kept after packing
#: (measured in docs/results/measured_constants.md#undo-record-reserve).
RECORD_FRACTION = 0.125
#: The fused merge over its roofline at :data:`H100` rates: its delta GEMM runs below the tensor
#: cores' rate (measured in docs/results/measured_constants.md#fused-merge).
MERGE_OVERHEAD = 1.5
#: The undo runs asynchronously: a request waits for only part of it
#: (measured in docs/results/measured_constants.md#undo-on-the-critical-path).
UNDO_CRITICAL_SHARE = 0.2
#: Merged ahead (``Request.prepare``), the share of a merge left on the request's path, with the
#: announced calls on the urgent stream: it varies with how host-bound stage 1's calls are, and
#: this takes the larger end (measured in
#: docs/results/measured_constants.md#merge-ahead-on-the-critical-path).
AHEAD_CRITICAL_SHARE = 0.45
#: Host time of one PEFT LoRA layer's forward, in eager launches: its 4 kernels plus the Python
#: around them (measured in docs/results/measured_constants.md#peft-forward-host-time).
HOST_LAUNCHES_PER_ADAPTER = 12
#: Our forward (ops.forward) over its roofline: its rank-384 GEMMs run below the tensor cores'
#: rate (measured in docs/results/measured_constants.md#fused-forward-overhead).
FUSED_OVERHEAD = 1.5
#: Host time of one layer under our forward, in eager launches: two more aten calls and a Python
#: call (measured in docs/results/measured_constants.md#fused-forward-host-time).
FUSED_HOST_LAUNCHES = 5


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return value


def _positive_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PhaseWork:
    """``steps`` denoising steps of ``passes`` DiT calls over ``tokens`` video tokens each (a call that
    batches guidance branches, as diffusers' CFG call does, runs their tokens together)."""

    steps: int
    tokens: int
    passes: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "tokens", "passes"):
            _positive_int(getattr(self, name), f"PhaseWork.{name}")


#: The LTX-2 two-stage recipe at 768x512, 121 frames (latent 24x16x16 at stage 2, half of each
#: side at stage 1): 30 guided steps of 2 DiT calls (the CFG batch of two, 3072 tokens, and the
#: modality pass, 1536: LTX-2's DiT has no perturbed attention, so no STG pass), 3 unguided steps.
RECIPE: Mapping[Phase, PhaseWork] = {
    Phase.STAGE1: PhaseWork(steps=30, tokens=2304, passes=2),
    Phase.STAGE2: PhaseWork(steps=3, tokens=6144, passes=1),
}


@dataclass(frozen=True)
class DeviceRates:
    """Achieved rates of one device: bf16 matmul (TFLOP/s), memory copy (GiB/s), one launch (µs)."""

    matmul_tflops: float
    hbm_gibps: float
    launch_us: float

    def __post_init__(self) -> None:
        for name in ("matmul_tflops", "hbm_gibps", "launch_us"):
            _positive_float(getattr(self, name), f"DeviceRates.{name}")

    @classmethod
    def default_for(cls, device: torch.device | str) -> DeviceRates:
        """Rates without a probe: an H100-class card for CUDA, a modest CPU otherwise."""
        return H100 if torch.device(device).type == "cuda" else CPU

    @classmethod
    def measure(cls, device: torch.device | str) -> DeviceRates:
        """A probe, cached per device: brief, so it runs on the device's first use
        (measured in docs/results/measured_constants.md#rate-probe)."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if (key := str(dev)) not in _MEASURED:
            try:
                _MEASURED[key] = _probe(dev)
            except torch.OutOfMemoryError:  # a full card: keep serving, with the documented rates
                _MEASURED[key] = cls.default_for(dev)
        return _MEASURED[key]


#: H100 (80 GB HBM3): achieved rates, not the card's peaks, as the rooflines need: bf16 matmul,
#: the one-read-one-write copy floor, one eager launch
#: (measured in docs/results/measured_constants.md#h100-rates).
H100 = DeviceRates(matmul_tflops=600.0, hbm_gibps=2400.0, launch_us=8.0)
CPU = DeviceRates(matmul_tflops=0.1, hbm_gibps=10.0, launch_us=5.0)
_MEASURED: dict[str, DeviceRates] = {}


def _best_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Best of ``reps`` timed calls after one warm-up; the minimum rejects scheduler noise."""
    sync: Callable[[], object] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def _probe(device: torch.device) -> DeviceRates:
    # CUDA: a 4096³ bf16 GEMM (0.14 TFLOP) and a 256 MiB copy, each brief
    # (measured in docs/results/measured_constants.md#rate-probe); CPU: small sizes
    cuda = device.type == "cuda"
    n, dtype, copy_elems = (4096, torch.bfloat16, 128 << 20) if cuda else (256, torch.float32, 4 << 20)
    with torch.no_grad():
        # lists, so each pair is freed (clear) before the next is allocated
        ab = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
        matmul_ms = _best_ms(lambda: ab[0] @ ab[1], device)
        ab.clear()
        bufs = [torch.empty(copy_elems, device=device, dtype=torch.bfloat16) for _ in range(2)]
        copy_ms = _best_ms(lambda: bufs[1].copy_(bufs[0]), device)
        bufs.clear()
        tiny, launches = torch.zeros(1, device=device), 200
        launch_ms = _best_ms(lambda: [tiny.add_(1.0) for _ in range(launches)], device)
    # a copy reads and writes each of its 2-byte elements
    return DeviceRates(matmul_tflops=2 * n**3 / matmul_ms / 1e9, hbm_gibps=4 * copy_elems / copy_ms * 1e3 / 2**30,
                       launch_us=launch_ms * 1e3 / launches)


@dataclass(frozen=True)
class MixCost:
    """A phase's LoRAs as the two ways of applying them cost: ``merged``, the live LoRAs a merge
    writes (each a pass over its layers); ``dynamic``, what the dynamic forward computes (the live
    LoRAs at their own ranks; on a compiled DiT every adapter of every adapted layer)."""

    merged: AdapterCost
    dynamic: AdapterCost


@dataclass(frozen=True)
class AdapterCost:
    """The adapted layers, summed into what the two formulas need (one entry per LoRA and layer)."""

    layers: int
    weight_elems: int  # Σ out·in: what a merge reads and writes
    delta_macs: int  # Σ rank·out·in: the merge's B @ A
    lora_elems: int  # Σ rank·(in + out): the factors each dynamic forward reads
    lora_macs_per_token: float  # Σ share·rank·(in + out)
    activation_bytes_per_token: float  # Σ share·(in + 2·rank + 6·out)·elem_bytes
    elem_bytes: int = 2
    shapes: tuple[tuple[int, int, int, float], ...] = field(default=(), compare=False, repr=False)
    """``(out, in, rank, token_share)`` per entry: our forward picks its form layer by layer."""

    @classmethod
    def of(cls, layers: Iterable[tuple[int, int, int] | tuple[int, int, int, float]],
           elem_bytes: int = 2) -> AdapterCost:
        """From ``(out, in, rank[, token_share])`` per adapted layer; ``token_share`` (default 1) is the
        fraction of the phase's video tokens the layer runs on (:func:`ltx2_token_share`).

        Activation elements per token: lora_A reads x (in), writes h (rank); lora_B reads h
        (rank), writes y (out); ``* scaling`` reads and writes (2·out); ``result + y`` (3·out)."""
        count = weights = delta = factors = 0
        macs = act = 0.0
        shapes = []
        for entry in layers:  # one pass: ``layers`` may be a generator
            if len(entry) not in (3, 4):
                raise ConfigError(f"adapted layer {entry!r}: expected (out, in, rank) or (out, in, rank, token_share)")
            out, inp, rank = (_positive_int(v, f"adapted layer {entry!r}: {name}")
                              for v, name in zip(entry[:3], ("out", "in", "rank"), strict=True))
            share = float(entry[3]) if len(entry) == 4 else 1.0  # type: ignore[misc]
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"adapted layer {entry!r}: token_share must be in [0, 1], got {share!r}")
            count += 1
            weights, delta, factors = weights + out * inp, delta + rank * out * inp, factors + rank * (inp + out)
            macs += share * rank * (inp + out)
            act += share * (inp + 2 * rank + 6 * out) * elem_bytes
            shapes.append((out, inp, rank, share))
        if count == 0:
            raise ConfigError("AdapterCost.of: no adapted layers (a LoRA without targets has no cost to model)")
        return cls(count, weights, delta, factors, macs, act, elem_bytes, tuple(shapes))


@dataclass(frozen=True)
class Decision:
    kind: ApplyKind
    merge_ms: float  # merge + the undo's critical-path share (+ a previous phase's undo)
    dynamic_ms: float  # every forward's adapter overhead (+ a previous phase's undo)
    reason: str


class CostModel:
    """Compares the two ways of applying one set of adapters to a phase; see the module doc."""

    def __init__(self, rates: DeviceRates, adapters: AdapterCost, *, headroom_bytes: int | None = None,
                 record_fraction: float = RECORD_FRACTION, device: torch.device | None = None,
                 dynamic_forward: str = "peft", skip_cold: bool = False, compiled: bool = False) -> None:
        if not 0.0 <= record_fraction <= 1.0:
            raise ConfigError(f"record_fraction must be in [0, 1], got {record_fraction!r}")
        if dynamic_forward not in ("peft", "fused"):
            raise ConfigError(f"dynamic_forward must be 'peft' or 'fused', got {dynamic_forward!r}")
        self.rates, self.adapters, self.record_fraction = rates, adapters, record_fraction
        self.dynamic_forward = dynamic_forward
        # a compiled DiT: its graphs launch the adapters' kernels with the rest, so they add device
        # time only, and every managed LoRA of a layer is computed (ops.forward's graph form)
        self.compiled = compiled
        self.device = device  # where refresh_headroom() reads free memory
        self.headroom_bytes = headroom_bytes  # free device memory; None = unlimited (a server updates it)
        # measured times replace the estimates: (ms, the adapters measured); another mix of adapters
        # is priced by scaling the measurement by the two estimates
        self._merge_seen: tuple[float, AdapterCost] | None = None
        self._undo_seen: tuple[float, AdapterCost] | None = None
        # skip_cold: on a GPU a process's first merge and first undo carry the kernels' first launches
        # (Triton's compilation, hundreds of ms); taken as the cost, one such time could keep a phase
        # dynamic for good, as no merge would run again to correct it
        self._cold = {"merge", "undo"} if skip_cold else set()

    @classmethod
    def for_targets(cls, targets: Sequence[Any], dynamic_forward: str = "peft", compiled: bool = False) -> CostModel:
        """The model of a manager's adapted layers (``LayerTarget``s: name, weight, lora_A), on the
        rates measured on their device, for the dynamic forward the manager runs."""
        layers = [(t.weight.shape[0], t.weight.shape[1], t.lora_A.shape[0], ltx2_token_share(t.name))
                  for t in targets]
        device = targets[0].weight.device
        return cls(DeviceRates.measure(device), AdapterCost.of(layers), device=device,
                   dynamic_forward=dynamic_forward, skip_cold=device.type == "cuda", compiled=compiled)

    def refresh_headroom(self) -> None:
        """Take the device's free memory now as the headroom (CUDA; unlimited elsewhere)."""
        if self.device is not None and self.device.type == "cuda":
            # what the driver has free plus what torch's caching allocator holds unused: a
            # request's activations were freed into the cache, and the records would reuse it
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self.headroom_bytes = torch.cuda.mem_get_info(self.device)[0] + cached

    def observe_records(self, fraction: float) -> None:
        """The share of elements the last merge recorded (deterministic per LoRA and strength: the
        next merge of it needs the same)."""
        if 0.0 < fraction <= 1.0:
            self.record_fraction = fraction

    def observe_merge(self, ms: float, adapters: AdapterCost | None = None) -> None:
        """The last merge's measured time (it ends in a host sync, so the trace's duration is it),
        of ``adapters`` (default: the model's own)."""
        ms = _positive_float(ms, "observe_merge(ms)")
        if "merge" in self._cold:
            self._cold.discard("merge")
            return
        self._merge_seen = (ms, adapters or self.adapters)

    def observe_undo(self, ms: float, adapters: AdapterCost | None = None) -> None:
        """The last undo's measured time on the request's path (the rest runs asynchronously)."""
        ms = _positive_float(ms, "observe_undo(ms)")
        if "undo" in self._cold:
            self._cold.discard("undo")
            return
        self._undo_seen = (ms, adapters or self.adapters)

    def record_bytes(self, adapters: AdapterCost | None = None) -> int:
        """Temporary device memory the merge needs for its exact-undo records."""
        return math.ceil(RECORD_BYTES * self.record_fraction * (adapters or self.adapters).weight_elems)

    def _merge_estimate_ms(self, adapters: AdapterCost | None = None) -> float:
        a, r = adapters or self.adapters, self.rates
        moved = 2 * a.elem_bytes * a.weight_elems + self.record_bytes(a)  # read + write W, write records
        roofline_s = moved / (r.hbm_gibps * 2**30) + 2 * a.delta_macs / (r.matmul_tflops * 1e12)
        return MERGE_OVERHEAD * roofline_s * 1e3

    def _seen(self, seen: tuple[float, AdapterCost] | None, adapters: AdapterCost | None) -> float | None:
        """A measurement, scaled to ``adapters`` by the estimates when it was taken on others."""
        if seen is None:
            return None
        ms, measured = seen
        a = adapters or self.adapters
        return ms if a == measured else ms * self._merge_estimate_ms(a) / self._merge_estimate_ms(measured)

    def undo_ms(self, adapters: AdapterCost | None = None) -> float:
        """The undo's critical-path time: measured, or a share of a merge-sized estimate (same passes)."""
        seen = self._seen(self._undo_seen, adapters)
        return seen if seen is not None else UNDO_CRITICAL_SHARE * self._merge_estimate_ms(adapters)

    def merge_ms(self, adapters: AdapterCost | None = None) -> float:
        """A merge of ``adapters`` (default: the model's own) and its undo."""
        seen = self._seen(self._merge_seen, adapters)
        return (seen if seen is not None else self._merge_estimate_ms(adapters)) + self.undo_ms(adapters)

    def forward_overhead_ms(self, tokens: int, adapters: AdapterCost | None = None) -> float:
        """What the adapters add to one DiT call: the larger of device and host time (the host queues ahead).

        Where the base call is device-bound with host slack, part of the host time hides and this
        overestimates; host-bound, the estimate falls within the measured range (measured in
        docs/results/measured_constants.md#peft-forward-overhead-estimate)."""
        a, r = adapters or self.adapters, self.rates
        _positive_int(tokens, "tokens")
        if self.dynamic_forward == "fused":
            return self._fused_overhead_ms(tokens, a)
        device_s = (2 * tokens * a.lora_macs_per_token / (r.matmul_tflops * 1e12)
                    + (tokens * a.activation_bytes_per_token + a.elem_bytes * a.lora_elems) / (r.hbm_gibps * 2**30))
        host_s = 0.0 if self.compiled else HOST_LAUNCHES_PER_ADAPTER * a.layers * r.launch_us * 1e-6
        return max(device_s, host_s) * 1e3

    def _fused_overhead_ms(self, tokens: int, a: AdapterCost) -> float:
        """Our forward: per layer the cheaper of the factored form (FLOPs and traffic ∝ tokens: x
        read, h written and read, y read and written) and the transient merge (B @ A, W read, W'
        written, the factors read); the host adds a few launches per layer."""
        r = self.rates
        flop_s, byte_s = 1.0 / (r.matmul_tflops * 1e12), 1.0 / (r.hbm_gibps * 2**30)
        device_s = 0.0
        for out, inp, rank, share in a.shapes:
            t = tokens * share
            factored = 2 * t * rank * (inp + out) * flop_s + t * (inp + 2 * rank + 2 * out) * a.elem_bytes * byte_s
            merged = 2 * rank * out * inp * flop_s + (2 * out * inp + rank * (inp + out)) * a.elem_bytes * byte_s
            device_s += min(factored, merged)
        host_s = 0.0 if self.compiled else FUSED_HOST_LAUNCHES * a.layers * r.launch_us * 1e-6
        return max(FUSED_OVERHEAD * device_s, host_s) * 1e3

    def dynamic_ms(self, work: PhaseWork, adapters: AdapterCost | None = None) -> float:
        return work.steps * work.passes * self.forward_overhead_ms(work.tokens, adapters)

    def choose(self, work: PhaseWork, strengths_live: bool, previous_merged: bool = False,
               ahead: bool = False, mix: MixCost | None = None) -> Decision:
        """Merge only if strictly cheaper and its records fit; a tie leaves the shared DiT untouched.
        ``ahead``: the merge would run behind the phase before's last calls, its cost mostly hidden.
        ``mix``: the request's LoRAs for this phase (default: the model's own, all live)."""
        if not strengths_live:
            return Decision(ApplyKind.NONE, 0.0, 0.0, "every strength is 0: the base weights run")
        merged, dynamic_adapters = (None, None) if mix is None else (mix.merged, mix.dynamic)
        # the manager restores a merged previous phase before either way (manager._enter_phase),
        # so its undo is charged to both sides: it shows in the totals and never tips the choice
        before = self.undo_ms() if previous_merged else 0.0
        undo = self.undo_ms(merged)
        merge_ms = self.merge_ms(merged) - undo
        merge = before + (AHEAD_CRITICAL_SHARE if ahead else 1.0) * merge_ms + undo
        dynamic = before + self.dynamic_ms(work, dynamic_adapters)
        need = self.record_bytes(merged)
        if self.headroom_bytes is not None and need > self.headroom_bytes:
            return Decision(ApplyKind.DYNAMIC, merge, dynamic,
                            f"the merge's undo records need {need / 2**30:.2f} GiB, "
                            f"only {self.headroom_bytes / 2**30:.2f} GiB free")
        kind = ApplyKind.MERGED if merge < dynamic else ApplyKind.DYNAMIC
        how = "merge ahead" if ahead else "merge"
        return Decision(kind, merge, dynamic, f"{how} {merge:.1f} ms vs dynamic {dynamic:.1f} ms "
                                              f"over {work.steps * work.passes} calls at {work.tokens} tokens")


# LTX-2's block linears (diffusers' LTX2VideoTransformer3DModel, default config): AutoPolicy's
# fallback when the manager passes no CostModel.
_V, _A = 4096, 2048
_QKVO = ("to_q", "to_k", "to_v", "to_out.0")
LTX2_BLOCK_LINEARS: tuple[tuple[str, int, int], ...] = (
    *((f"{a}.{p}", d, d) for a, d in (("attn1", _V), ("attn2", _V), ("audio_attn1", _A), ("audio_attn2", _A))
      for p in _QKVO),
    ("ff.net.0.proj", 4 * _V, _V), ("ff.net.2", _V, 4 * _V),
    ("audio_ff.net.0.proj", 4 * _A, _A), ("audio_ff.net.2", _A, 4 * _A),
    ("audio_to_video_attn.to_q", _A, _V), ("audio_to_video_attn.to_k", _A, _A),  # (name, out, in)
    ("audio_to_video_attn.to_v", _A, _A), ("audio_to_video_attn.to_out.0", _V, _A),
    ("video_to_audio_attn.to_q", _A, _A), ("video_to_audio_attn.to_k", _A, _V),
    ("video_to_audio_attn.to_v", _A, _V), ("video_to_audio_attn.to_out.0", _A, _A),
)
LTX2_BLOCKS = 48
# Layers on the video tokens. The others run on the audio latents (~126 at 121 frames, 2 % of the
# stage-2 video tokens) or project the prompt (≤ 1024 tokens; 2 of the 12 video-width layers):
# counting them as 0 underestimates dynamic by at most ~15 %, erring towards leaving the DiT alone.
_VIDEO_FED = re.compile(r"(?:^|\.)(?:attn1\.|ff\.|attn2\.to_(?:q|out)|audio_to_video_attn\.to_(?:q|out)"
                        r"|video_to_audio_attn\.to_[kv])")
_LTX2_SIDE = re.compile(r"(?:^|\.)(?:audio_|attn2\.|video_to_audio_attn\.)")


def ltx2_token_share(module_name: str) -> float:
    """1 for an LTX-2 block linear on the video tokens, 0 on audio or text tokens, 1 if unknown."""
    if _VIDEO_FED.search(module_name):
        return 1.0
    return 0.0 if _LTX2_SIDE.search(module_name) else 1.0


def ltx2_adapter_cost(rank: int = 384, blocks: int = LTX2_BLOCKS) -> AdapterCost:
    """One LoRA of ``rank`` on every block linear of the LTX-2 DiT (the distilled LoRA's targets)."""
    return AdapterCost.of((out, inp, rank, ltx2_token_share(name))
                          for _ in range(blocks) for name, out, inp in LTX2_BLOCK_LINEARS)


def ltx2_reference_model() -> CostModel:
    """The real DiT, the distilled LoRA's rank and H100 rates: AutoPolicy's model without measurements."""
    return CostModel(H100, ltx2_adapter_cost())
