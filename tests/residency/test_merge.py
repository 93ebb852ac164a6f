"""Unit tests of ``ltx2_residency.ops.merge``: in-place LoRA merges and their exact LIFO undo.

Plain bf16 ``nn.Linear`` layers of realistic shapes, LoRA factors scaled so that
‖scale·B·A‖ is 5-20 % of ‖W‖ (smaller deltas hide bf16 rounding: every merge would look
reversible). Ground truth is always the layers' bits, compared as int16.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ltx2_residency import LoRAValueError, ResidencyError
from ltx2_residency.faults import FaultInjector
from ltx2_residency.ops.exact import EXACT_KERNELS, CopyExactMerge, RecomputeExactMerge
from ltx2_residency.ops.fingerprint import Digest, Fingerprint
from ltx2_residency.ops.merge import MergeStack
from ltx2_residency.ops.undo import LayerTarget, LayerUndo, RestoreMismatchError
from strategies import strengths

SHAPES: tuple[tuple[int, int], ...] = ((256, 512), (512, 256), (384, 384))  # (out, in) of W
REL_NORMS = (0.05, 0.10, 0.20)
RESTORES = list(EXACT_KERNELS)

# Local strategies (candidates for tests/strategies.py).
ranks = st.integers(min_value=1, max_value=32)
rel_norms = st.one_of(st.sampled_from(REL_NORMS),
                      st.floats(min_value=0.05, max_value=0.20, allow_nan=False))
restore_names = st.sampled_from(RESTORES)


def _base_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """nn.Linear's default init range (uniform ±1/sqrt(fan_in)), seeded, in bf16."""
    gen = torch.Generator().manual_seed(1000 + seed)
    bound = 1.0 / shape[1] ** 0.5
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(torch.bfloat16)


# Built once: hypothesis examples clone these instead of re-drawing 400k random numbers each time.
_BASE = [_base_weight(s, i) for i, s in enumerate(SHAPES)]


def _layers(scale: float = 1.0) -> list[nn.Linear]:
    out = []
    for w in _BASE:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.requires_grad_(False)
        lin.weight.copy_(w * scale)  # powers of two scale bf16 exactly
        out.append(lin)
    return out


def _target(lin: nn.Linear, name: str, *, rank: int, rel: float, seed: int,
            alpha: float | None = None) -> LayerTarget:
    """A LoRA on ``lin`` whose delta at strength 1 has norm ``rel``·‖W‖ (bf16 factors)."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = lin.weight.shape
    r = min(rank, out_f, in_f)
    scale = alpha / r if alpha is not None else 1.0
    a = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
    b = torch.randn(out_f, r, generator=gen)
    b *= rel * lin.weight.float().norm() / (scale * (b @ a)).norm().clamp_min(1e-12)
    return LayerTarget(name, lin.weight, a.to(torch.bfloat16), b.to(torch.bfloat16), scale)


def _targets(layers: list[nn.Linear], *, rank: int = 8, rel: float = 0.10, seed: int = 0,
             alpha: float | None = None) -> list[LayerTarget]:
    return [_target(lin, f"layer{i}", rank=rank, rel=rel, seed=seed * 100 + i, alpha=alpha)
            for i, lin in enumerate(layers)]


def _bits(layers: list[nn.Linear]) -> list[torch.Tensor]:
    return [lin.weight.detach().view(torch.int16).clone() for lin in layers]


def _assert_bits(layers: list[nn.Linear], expected: list[torch.Tensor]) -> None:
    now = _bits(layers)
    moved = [int((n != e).sum()) for n, e in zip(now, expected, strict=True)]
    assert moved == [0] * len(expected), f"elements moved per layer: {moved}"


def _reference_merge(t: LayerTarget, strength: float) -> torch.Tensor:
    """The documented merge, written independently: bf16(W + s·scale·B·A), one rounding."""
    delta = (t.lora_B.float() @ t.lora_A.float()) * (strength * t.scale)
    return (t.weight.detach().float() + delta).to(torch.bfloat16)


def _stack(restore: str, faults: FaultInjector | None = None, *, check_layers: bool = True) -> MergeStack:
    if restore == "fused" and torch.cuda.is_available():
        # these layers are CPU tensors, for Triton's interpreter; on a GPU the compiled kernels
        # are tested by test_kernels and test_ahead
        pytest.skip("the fused cases here run CPU tensors through the interpreter (no GPU)")
    return MergeStack(EXACT_KERNELS[restore](), faults or FaultInjector(), check_layers=check_layers)


def _relative_norm(t: LayerTarget, strength: float = 1.0) -> float:
    return float(t.delta(strength).norm() / t.weight.detach().float().norm())


# ---------------------------------------------------------------------------- push / pop_all
@pytest.mark.parametrize("check_layers", [False, True], ids=["fast", "checked"])
@pytest.mark.parametrize("rel", REL_NORMS)
@pytest.mark.parametrize("restore", RESTORES)
def test_push_then_pop_all_restores_bits_exactly(restore: str, rel: float, check_layers: bool) -> None:
    layers = _layers()
    original = _bits(layers)
    targets = _targets(layers, rel=rel)
    assert all(abs(_relative_norm(t) - rel) < 0.02 for t in targets)
    expected = [_reference_merge(t, 1.0) for t in targets]
    stack = _stack(restore, check_layers=check_layers)

    written = stack.push("distilled", targets, 1.0)

    nbytes = sum(lin.weight.numel() * 2 for lin in layers)
    assert written == nbytes
    for lin, exp in zip(layers, expected, strict=True):
        assert torch.equal(lin.weight.view(torch.int16), exp.view(torch.int16))
    assert stack and len(stack.frames) == 1 and stack.nbytes_held > 0

    assert stack.pop_all() == nbytes
    _assert_bits(layers, original)
    assert not stack and stack.nbytes_held == 0


@pytest.mark.parametrize("restore", RESTORES)
def test_stacked_pushes_are_undone_lifo_exactly(restore: str) -> None:
    layers = _layers()
    original = _bits(layers)
    # Three LoRAs: different ranks, norms, an alpha, and one that touches only two layers.
    plan = [
        ("distilled", _targets(layers, rank=8, rel=0.10, seed=1), 1.0),
        ("style", _targets(layers, rank=4, rel=0.20, seed=2, alpha=8.0), 0.5),
        ("detail", _targets(layers[1:], rank=16, rel=0.05, seed=3), 1.3),
    ]
    stack = _stack(restore)
    for depth, (name, targets, strength) in enumerate(plan, start=1):
        expected = [_reference_merge(t, strength) for t in targets]
        stack.push(name, targets, strength)
        for t, exp in zip(targets, expected, strict=True):
            assert torch.equal(t.weight.view(torch.int16), exp.view(torch.int16)), (name, t.name)
        assert [f.lora for f in stack.frames] == [p[0] for p in plan[:depth]]
        assert [f.strength for f in stack.frames] == [p[2] for p in plan[:depth]]
    assert any(not torch.equal(b, o) for b, o in zip(_bits(layers), original, strict=True))

    stack.pop_all()
    _assert_bits(layers, original)
    assert stack.frames == []


@given(
    loras=st.lists(st.tuples(strengths, ranks, rel_norms, st.integers(0, 2**16)),
                   min_size=1, max_size=3),
    restore=restore_names,
    check_layers=st.booleans(),
)
def test_any_stack_of_realistic_loras_restores_exactly(
    loras: list[tuple[float, int, float, int]], restore: str, check_layers: bool,
) -> None:
    layers = _layers()
    original = _bits(layers)
    stack = _stack(restore, check_layers=check_layers)
    for i, (strength, rank, rel, seed) in enumerate(loras):
        targets = _targets(layers, rank=rank, rel=rel, seed=seed)
        expected = [_reference_merge(t, strength) for t in targets]
        stack.push(f"lora{i}", targets, strength)
        for t, exp in zip(targets, expected, strict=True):
            assert torch.equal(t.weight.view(torch.int16), exp.view(torch.int16))
    stack.pop_all()
    _assert_bits(layers, original)


# ---------------------------------------------------------------------------- why exceptions exist
class _NaiveRecompute(RecomputeExactMerge):
    """Recompute without the exception patches: what PEFT's unmerge does (subtract the delta)."""

    name = "naive-recompute"

    def capture(self, target: LayerTarget, merged: torch.Tensor, delta: torch.Tensor,
                digest: Digest | None) -> LayerUndo:
        undo = super().capture(target, merged, delta, digest)
        empty = (undo.tensors[0][:0], undo.tensors[1][:0])
        return LayerUndo(undo.digest, empty, 0)


def test_naive_recompute_does_not_restore_realistic_deltas() -> None:
    fractions: dict[float, float] = {}
    for rel in REL_NORMS:
        layers = _layers()
        original = _bits(layers)
        targets = _targets(layers, rel=rel, seed=5)
        stack = _stack("recompute")
        stack.push("distilled", targets, 1.0)

        # Subtracting the delta again, computed here independently of the stack.
        missed = 0
        for t, orig in zip(targets, original, strict=True):
            naive = (t.weight.float() - (t.lora_B.float() @ t.lora_A.float()) * t.scale)
            missed += int((naive.to(torch.bfloat16).view(torch.int16) != orig).sum())
        total = sum(o.numel() for o in original)
        assert missed > 0, f"rel {rel}: subtracting the delta restored every bit"
        # The stack records exactly the positions where subtraction fails, no more, no fewer.
        assert stack.last_exception_fraction == pytest.approx(missed / total, abs=0, rel=1e-12)
        fractions[rel] = stack.last_exception_fraction
        stack.pop_all()
        _assert_bits(layers, original)
    # Larger deltas move more sums across a bf16 exponent boundary, so lose more bits.
    assert fractions[0.05] < fractions[0.10] < fractions[0.20]
    print("recompute exception fraction by ‖ΔW‖/‖W‖: "
          + ", ".join(f"{r:.2f}: {f:.2%}" for r, f in fractions.items()))


@pytest.mark.parametrize("rel", REL_NORMS)
def test_undo_without_exceptions_is_caught_not_silent(rel: float) -> None:
    layers = _layers()
    original = _bits(layers)
    stack = MergeStack(_NaiveRecompute(), FaultInjector(), check_layers=True)
    stack.push("distilled", _targets(layers, rel=rel, seed=6), 1.0)

    with pytest.raises(RestoreMismatchError) as info:
        stack.pop_all()
    msg = str(info.value)
    assert "'distilled'" in msg and "'layer2'" in msg and "pre-merge bits" in msg
    assert "'naive-recompute'" in msg
    # The layer that failed keeps its frame entry (a repair can still find it); only it drifted.
    assert [t.name for t, _ in stack.frames[0].layers] == ["layer0", "layer1", "layer2"]
    drift = int((_bits(layers)[2] != original[2]).sum())
    assert drift > 0


# ---------------------------------------------------------------------------- memory
def test_recompute_captures_less_than_a_copy_at_ten_percent() -> None:
    held: dict[str, int] = {}
    exceptions = 0
    for restore in ("recompute", "copy"):
        layers = _layers()
        original = _bits(layers)
        stack = _stack(restore)
        stack.push("distilled", _targets(layers, rel=0.10, seed=7), 1.0)
        held[restore] = stack.nbytes_held
        if restore == "recompute":
            exceptions = sum(u.exceptions for _, u in stack.frames[0].layers)
        stack.pop_all()
        _assert_bits(layers, original)
    weight_bytes = sum(w.numel() * w.element_size() for w in _BASE)
    assert held["copy"] == weight_bytes  # a full copy of every merged layer
    assert held["recompute"] == exceptions * (4 + 2)  # int32 index + bf16 value per exception
    assert held["recompute"] < held["copy"]
    print(f"capture bytes at 10 %: recompute {held['recompute']} vs copy {held['copy']} "
          f"({held['recompute'] / held['copy']:.1%})")


# ---------------------------------------------------------------------------- non-finite merge
@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_merge_raises_and_partial_stack_restores(restore: str) -> None:
    # layer2 is 2**13 times larger than the others (exact in bf16), so one strength can overflow
    # its delta to inf while layer0/layer1 stay finite: the failure strikes mid-frame.
    layers = _layers()
    big = _layers(scale=2.0**13)[2]
    layers[2] = big
    original = _bits(layers)
    stack = _stack(restore)
    stack.push("distilled", _targets(layers, rel=0.10, seed=8), 1.0)
    after_first = _bits(layers)

    targets = _targets(layers, rel=0.10, seed=9)
    peaks = [float(t.delta(1.0).abs().max()) for t in targets]
    huge = 1e39 / peaks[2]  # layer2's delta peaks at 1e39 > float32 max
    assert huge * max(peaks[:2]) < 1e37  # the other two stay finite in bf16 (max ~3.4e38)
    assert huge < 3e38  # the strength itself is a finite float32

    with pytest.raises(LoRAValueError) as info:
        stack.push("boost", targets, huge)
    msg = str(info.value)
    assert "'boost'" in msg and "'layer2'" in msg and "non-finite" in msg
    assert "lower the strength" in msg
    assert isinstance(info.value, ValueError)

    # Two layers of the failing frame were written; layer2 was not touched. The torch strategies
    # stop at layer2; the fused one launched all three and recorded layer2 with unwritten tiles.
    assert [f.lora for f in stack.frames] == ["distilled", "boost"]
    recorded = ["layer0", "layer1", "layer2"] if restore == "fused" else ["layer0", "layer1"]
    assert [t.name for t, _ in stack.frames[1].layers] == recorded
    now = _bits(layers)
    if restore != "fused":
        assert not torch.equal(now[0], after_first[0]) and not torch.equal(now[1], after_first[1])
    # (fused: at this strength nearly every element needs a record, more than the first guess
    # holds, and the non-finite layer is reported before the tiles without room are retried)
    assert torch.equal(now[2], after_first[2])

    stack.pop_all()
    _assert_bits(layers, original)


# ---------------------------------------------------------------------------- injected faults
class InjectedFault(RuntimeError):
    pass


FAULTS: dict[str, Callable[[], BaseException]] = {
    "exception": lambda: InjectedFault("injected"),
    "keyboard_interrupt": KeyboardInterrupt,
    "oom": lambda: torch.OutOfMemoryError("injected OOM"),
}


@pytest.mark.parametrize("kind", list(FAULTS))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("restore", RESTORES)
def test_fault_at_kth_merge_layer_leaves_an_exactly_undoable_stack(restore: str, k: int,
                                                                   kind: str) -> None:
    layers = _layers()
    original = _bits(layers)
    faults = FaultInjector()
    stack = _stack(restore, faults)
    stack.push("distilled", _targets(layers, seed=10), 1.0)
    after_first = _bits(layers)

    n = len(layers)
    faults.arm("merge.layer", FAULTS[kind], on_hit=k)  # counted from arming: the second push's k-th
    with pytest.raises(type(FAULTS[kind]())):
        stack.push("user", _targets(layers, rank=4, rel=0.15, seed=11, alpha=8.0), 0.7)
    assert faults.hits["merge.layer"] == n + k
    assert [t.name for t, _ in stack.frames[-1].layers] == [f"layer{i}" for i in range(k - 1)]
    now = _bits(layers)
    for i in range(k - 1, n):  # the faulting layer and those after it were never written
        assert torch.equal(now[i], after_first[i])

    stack.pop_all()
    _assert_bits(layers, original)
    assert not stack


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("restore", RESTORES)
def test_fault_mid_restore_then_second_pop_all_completes_exactly(restore: str, k: int) -> None:
    layers = _layers()
    original = _bits(layers)
    faults = FaultInjector()
    stack = _stack(restore, faults)
    stack.push("distilled", _targets(layers, seed=12), 1.0)
    stack.push("user", _targets(layers, rank=4, rel=0.15, seed=13, alpha=8.0), 0.5)

    faults.arm("restore.layer", lambda: InjectedFault("injected mid-restore"), on_hit=k)
    with pytest.raises(InjectedFault):
        stack.pop_all()
    n = len(layers)
    undone = k - 1  # layer undos that completed before the fault, newest first
    remaining = sum(len(f.layers) for f in stack.frames)
    assert remaining == 2 * n - undone
    if undone >= n:  # the whole "user" frame was undone: only "distilled" remains
        assert [f.lora for f in stack.frames] == ["distilled"]
    else:
        assert [f.lora for f in stack.frames] == ["distilled", "user"]

    stack.pop_all()  # the fault fired once; this call undoes the rest
    _assert_bits(layers, original)
    assert not stack
    assert faults.hits["restore.layer"] == 2 * n + 1


# ---------------------------------------------------------------------------- tampering
@pytest.mark.parametrize("restore", RESTORES)
def test_tampered_capture_raises_instead_of_drifting(restore: str) -> None:
    layers = _layers()
    original = _bits(layers)
    stack = _stack(restore, check_layers=True)
    stack.push("distilled", _targets(layers, rel=0.10, seed=14), 1.0)

    _, undo = stack.frames[0].layers[1]
    # One stored bf16 value gets its lowest mantissa bit flipped: the exception values of a
    # recompute capture, the backup of a copy capture.
    # fused: (tile flags, indices, values).
    stored = undo.tensors[{"recompute": 1, "fused": 2}.get(stack.strategy.name, 0)]
    assert stored.numel() > 0
    stored.view(torch.int16).view(-1)[0] ^= 1

    with pytest.raises(RestoreMismatchError) as info:
        stack.pop_all()
    err = info.value
    assert isinstance(err, ResidencyError) and isinstance(err, RuntimeError)
    msg = str(err)
    assert "'distilled'" in msg and "'layer1'" in msg and f"'{stack.strategy.name}'" in msg
    assert "pre-merge bits" in msg

    now = _bits(layers)
    assert torch.equal(now[2], original[2])  # undone before the damaged layer, exactly
    assert int((now[1] != original[1]).sum()) == 1  # the damage, reported, not hidden
    assert not torch.equal(now[0], original[0])  # not reached: still merged
    assert [t.name for t, _ in stack.frames[0].layers] == ["layer0", "layer1"]


@pytest.mark.parametrize("restore", RESTORES)
def test_tampered_capture_without_layer_checks_is_left_to_the_fingerprint(restore: str) -> None:
    # check_layers=False (the manager's default) skips the per-layer digest: pop_all cannot see
    # the damage, and the drift must be there for the manager's end-of-request fingerprint.
    layers = _layers()
    names = [f"layer{i}" for i in range(len(layers))]
    clean = Fingerprint.of(zip(names, (lin.weight for lin in layers), strict=True))
    stack = _stack(restore, check_layers=False)
    stack.push("distilled", _targets(layers, rel=0.10, seed=14), 1.0)
    _, undo = stack.frames[0].layers[1]
    assert undo.digest is None
    # fused: (tile flags, indices, values).
    stored = undo.tensors[{"recompute": 1, "fused": 2}.get(stack.strategy.name, 0)]
    stored.view(torch.int16).view(-1)[0] ^= 1

    stack.pop_all()
    assert not stack
    after = Fingerprint.of(zip(names, (lin.weight for lin in layers), strict=True))
    assert clean.differing(after) == ["layer1"]


def test_weight_written_behind_the_stacks_back_is_detected_by_recompute() -> None:
    # A recompute undo trusts the merged weight; something else writing to it must not turn
    # into silent drift. (A copy undo overwrites the whole layer, so the write just vanishes.)
    layers = _layers()
    stack = _stack("recompute")
    stack.push("distilled", _targets(layers, rel=0.10, seed=15), 1.0)
    _, undo = stack.frames[0].layers[2]
    patched = set(undo.tensors[0].tolist())
    pos = next(i for i in range(layers[2].weight.numel()) if i not in patched)
    layers[2].weight.view(torch.int16).view(-1)[pos] ^= 1

    with pytest.raises(RestoreMismatchError, match="'layer2'"):
        stack.pop_all()


def test_copy_capture_lives_on_the_requested_device() -> None:
    layers = _layers()
    original = _bits(layers)
    stack = MergeStack(CopyExactMerge("cpu"), FaultInjector())
    stack.push("distilled", _targets(layers, seed=16), 1.0)
    for t, undo in stack.frames[0].layers:
        (backup,) = undo.tensors
        assert backup.device.type == "cpu" and backup.dtype == torch.bfloat16
        assert backup.data_ptr() != t.weight.data_ptr()
    stack.pop_all()
    _assert_bits(layers, original)
