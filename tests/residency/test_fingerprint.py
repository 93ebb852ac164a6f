"""The fingerprint's digest: exact over bits, blind to no small structured edit, and the same
bits from the Triton kernel (interpreted on the CPU, compiled on a GPU) as from the torch path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ltx2_residency import ConfigError, DirtyWeightsError, Fingerprint, LoRASpec, ResidencyManager, WeightState
from ltx2_residency.ops.fingerprint import FingerprintPlan, tensor_digest

FLOATS = [torch.bfloat16, torch.float16, torch.float32]


def _bf16(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _edited(t: torch.Tensor, edit) -> torch.Tensor:
    """A copy of ``t`` with ``edit`` applied to its 16-bit words (an int16 view, wrapping)."""
    out = t.clone()
    edit(out.view(-1).view(torch.int16))
    return out


def _linear_sums(t: torch.Tensor) -> tuple[int, int, int]:
    """The linear checksum the digest replaced: 16-bit words, plain, position- and block-weighted."""
    x = t.contiguous().view(-1).view(torch.int16).long()
    i = torch.arange(len(x))
    return int(x.sum()), int((x * (i % 2**15 + 1)).sum()), int((x * (i // 2**15 + 1)).sum())


def _plus1_minus2_plus1(i: int):
    def edit(w: torch.Tensor) -> None:
        w[i] += 1
        w[i + 1] -= 2
        w[i + 2] += 1
    return edit


# ---------------------------------------------------------------------------- structured edits
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("at", [0, 1, 6, 4094, 40_001])  # both halves of a 32-bit word; deep in the tensor
def test_plus1_minus2_plus1_on_neighbouring_words_is_detected(dtype: torch.dtype, at: int) -> None:
    t = torch.randn(70_001, generator=torch.Generator().manual_seed(at)).to(dtype)
    moved = _edited(t, _plus1_minus2_plus1(at))
    assert _linear_sums(moved) == _linear_sums(t)  # the linear checksum's blind spot ...
    assert tensor_digest(moved) != tensor_digest(t)  # ... is not the digest's


def test_verify_clean_catches_a_plus1_minus2_plus1_edit(model, distilled_path) -> None:
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", distilled_path, {"stage1": 0.0, "stage2": 1.0})],
                           merge_policy="dynamic")
    mgr.verify_clean()
    name, w = list(mgr.managed_weights.items())[3]
    with torch.no_grad():
        _plus1_minus2_plus1(17)(w.view(-1).view(torch.int16))
    with pytest.raises(DirtyWeightsError, match=f"1 of .* managed weights differ.*{name}"):
        mgr.verify_clean()
    assert mgr.state is WeightState.QUARANTINED


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_single_bit_flip_in_every_position_class_is_detected(dtype: torch.dtype) -> None:
    # both halves of whole 32-bit words, the first and the last, and for the 16-bit dtypes an odd
    # last word that is zero-extended (37 16-bit words; 36 for float32)
    t = (torch.randn(37 * 2 // (torch.finfo(dtype).bits // 8), generator=torch.Generator().manual_seed(2))
         .to(dtype))
    n16 = t.numel() * t.element_size() // 2
    seen = {tensor_digest(t)}
    for i in range(n16):
        for bit in range(16):
            seen.add(tensor_digest(_edited(t, lambda w, i=i, b=bit: w.__setitem__(i, w[i] ^ _bit(b)))))
    assert len(seen) == 1 + 16 * n16  # every flip detected, and no two flips alike


def _bit(b: int) -> int:
    return (1 << b) if b < 15 else -(1 << 15)  # int16: the sign bit


@given(n=st.integers(1, 200_000), i=st.integers(0, 10**9), bit=st.integers(0, 15))
def test_any_single_bit_flip_is_detected(n: int, i: int, bit: int) -> None:
    t = _bf16(n)
    assert tensor_digest(t) != tensor_digest(_edited(t, lambda w: w.__setitem__(i % n, w[i % n] ^ _bit(bit))))


@given(n=st.integers(2, 200_000), i=st.integers(0, 10**9), j=st.integers(0, 10**9))
def test_swapping_two_different_words_is_detected(n: int, i: int, j: int) -> None:
    t = _bf16(n, seed=1)
    i, j = i % n, j % n
    words = t.view(torch.int16)
    if i == j or words[i] == words[j]:
        return
    assert tensor_digest(t) != tensor_digest(_edited(t, lambda w: w.__setitem__([i, j], w[[j, i]])))


@pytest.mark.parametrize(("what", "edit"), [
    ("the halves of one 32-bit word", lambda w: w.__setitem__([4, 5], w[[5, 4]])),
    ("two neighbouring 16-bit words across a 32-bit boundary", lambda w: w.__setitem__([5, 6], w[[6, 5]])),
    ("two neighbouring 32-bit words", lambda w: w.__setitem__(slice(8, 12), w[[10, 11, 8, 9]])),
    ("a run shifted by one word", lambda w: w.__setitem__(slice(100, 200), w[101:201].clone())),
    ("a run shifted by one 32-bit word", lambda w: w.__setitem__(slice(100, 200), w[102:202].clone())),
    ("a run reversed", lambda w: w.__setitem__(slice(300, 340), w[300:340].flip(0))),
])
def test_swaps_and_shifts_are_detected(what: str, edit) -> None:
    t = _bf16(1001, seed=3)
    assert tensor_digest(t) != tensor_digest(_edited(t, edit)), what


@pytest.mark.parametrize("dtype", FLOATS)
def test_sign_flips_are_detected(dtype: torch.dtype) -> None:
    t = torch.randn(33, generator=torch.Generator().manual_seed(4)).to(dtype)
    clean = tensor_digest(t)
    for i in range(t.numel()):
        flipped = t.clone()
        flipped[i] = -flipped[i]
        assert tensor_digest(flipped) != clean, f"the sign of element {i}"
    for i, j in [(0, 1), (1, 2), (5, 20), (0, 32)]:  # two at once: each change alone moves the sums
        flipped = t.clone()
        flipped[[i, j]] = -flipped[[i, j]]
        assert tensor_digest(flipped) != clean, f"the signs of elements {i} and {j}"
    assert tensor_digest(-t) != clean


def test_signed_zero_and_nan_payloads_count() -> None:
    z = torch.zeros(8, dtype=torch.bfloat16)
    nz = z.clone()
    nz[3] = -0.0
    assert torch.equal(z, nz)  # floats call them equal ...
    assert tensor_digest(z) != tensor_digest(nz)  # ... bits do not
    a = torch.full((4,), float("nan"), dtype=torch.float32)
    b = a.clone()
    b.view(torch.int32)[1] ^= 1  # another NaN payload
    assert tensor_digest(a) != tensor_digest(b)


def _finite_difference(order: int) -> list[int]:
    """``(+1, -1)``, ``(+1, -2, +1)``, ``(+1, -3, +3, -1)``, ...: edits every checksum weighted by a
    polynomial of degree < ``order`` in the position is blind to."""
    row = [1]
    for _ in range(order):
        row = [a - b for a, b in zip([*row, 0], [0, *row], strict=True)]
    return row


_structured_edits = st.one_of(
    st.builds(lambda order, scale: ("add", [scale * d for d in _finite_difference(order)]),
              st.integers(1, 5), st.sampled_from([1, -1, 2, 3, 256, 2**14])),
    st.tuples(st.just("add"), st.lists(st.integers(-4, 4), min_size=1, max_size=8)),
    st.tuples(st.just("xor"), st.lists(st.sampled_from([0, 1, 2, 0x80, 0x100, 0x4000, -(1 << 15)]),
                                       min_size=1, max_size=8)),
    st.tuples(st.just("permute"), st.permutations(range(6))),
)


@settings(derandomize=True, max_examples=200)
@given(edit=_structured_edits, at=st.integers(0, 10**6), n=st.integers(16, 5000), seed=st.integers(0, 3))
def test_small_structured_edits_are_detected(edit, at: int, n: int, seed: int) -> None:
    kind, values = edit
    t = _bf16(n, seed)
    at = at % (n - len(values) + 1)
    span = slice(at, at + len(values))
    moved = t.clone()
    w = moved.view(torch.int16)
    if kind == "add":  # on the words' integer patterns, wrapping
        x = w[span].long() + torch.tensor(values)
        w[span] = ((x + 2**15) % 2**16 - 2**15).to(torch.int16)
    elif kind == "xor":
        w[span] ^= torch.tensor(values, dtype=torch.int16)
    else:
        w[span] = w[span][torch.tensor(values)]
    if torch.equal(moved.view(torch.int16), t.view(torch.int16)):
        return  # the edit changed nothing (wrapped to zero, equal words permuted)
    assert tensor_digest(moved) != tensor_digest(t)


def test_a_plain_sum_would_miss_what_the_digest_catches() -> None:
    t = _bf16(70_000)
    moved = t.clone()
    w = moved.view(torch.int16)
    w[5] += 1
    w[65_541] -= 1
    assert int(t.view(torch.int16).long().sum()) == int(moved.view(torch.int16).long().sum())
    assert tensor_digest(t) != tensor_digest(moved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_digest_is_stable_and_dtype_agnostic(dtype: torch.dtype) -> None:
    t = (torch.randn(33, 17) * 10).to(dtype)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t.t().contiguous()) != tensor_digest(t) or t.numel() == 0
    assert tensor_digest(t)[2] == t.numel() * t.element_size()  # the byte count: [x] and [x, 0] differ


# ---------------------------------------------------------------------------- fingerprints
def test_fingerprint_reports_which_tensors_differ() -> None:
    ws = {"a": _bf16(10), "b": _bf16(10, 2), "c": _bf16(10, 3)}
    clean = Fingerprint.of(ws.items())
    ws["b"] = ws["b"].clone()
    ws["b"][0] += 1
    assert clean.differing(Fingerprint.of(ws.items())) == ["b"]
    assert len(clean) == 3
    assert clean.digests["a"] == tensor_digest(ws["a"])  # the batched torch path is tensor_digest's


@pytest.mark.parametrize("path", ["torch", "fused"])  # "fused": the Triton kernel (interpreted on the CPU)
def test_a_plan_fingerprints_again_and_follows_moved_tensors(path: str) -> None:
    g = torch.Generator().manual_seed(0)
    device = "cuda" if path == "fused" and torch.cuda.is_available() else "cpu"  # compiled where it can be
    weights = {f"w{i}": torch.nn.Parameter(torch.randn(8 + i, 24, generator=g).bfloat16().to(device),
                                           requires_grad=False) for i in range(5)}
    plan = FingerprintPlan(weights)
    clean = plan.compute()
    assert (plan._layout is not None) == (path == "fused")  # which path ran: the kernel's tables or none
    assert clean.digests == Fingerprint.of(weights.items()).digests == {
        n: tensor_digest(w) for n, w in weights.items()}
    assert plan.compute().differing(clean) == []
    with torch.no_grad():
        weights["w3"][2, 5] += 1.0
    assert plan.compute().differing(clean) == ["w3"]
    # a residency move rebinds .data: the plan must read the new storage, not the old tables
    weights["w1"].data = weights["w1"].detach().clone()
    with torch.no_grad():
        weights["w1"][0, 0] = -weights["w1"][0, 0] + 0.5
    assert sorted(plan.compute().differing(clean)) == ["w1", "w3"]
    # a fingerprint with sums on the device and one with host digests still compare
    assert sorted(Fingerprint.of(weights.items()).differing(clean)) == ["w1", "w3"]
    assert len(clean) == 5
    with torch.no_grad():  # the edit a linear checksum misses, through the plan's path
        _plus1_minus2_plus1(40)(weights["w4"].view(-1).view(torch.int16))
    assert sorted(plan.compute().differing(clean)) == ["w1", "w3", "w4"]


# ---------------------------------------------------------------------------- the kernel
@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    """The digest kernel: compiled on a GPU, else in Triton's interpreter (conftest sets
    ``TRITON_INTERPRET=1`` before Triton is first imported)."""
    pytest.importorskip("triton")
    from ltx2_residency.ops import digest_kernel

    if not torch.cuda.is_available():
        monkeypatch.setenv("LTX2_RESIDENCY_KERNELS", "interpret")
    return digest_kernel


def _kernel_rows(digest_kernel, tensors: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    assert digest_kernel.fits(tensors)
    return [tuple(r) for r in digest_kernel.launch_digests(tensors).tolist()]


# small tiles: blocks of 4 tiles of 32 words, so a few hundred words cross tile and block edges
@pytest.mark.parametrize("tiles", ["256,2,32,4", None])
@pytest.mark.parametrize("dtype", FLOATS)
def test_the_kernel_gives_the_torch_digests_bit_for_bit(kernel, monkeypatch, tiles, dtype) -> None:
    if tiles:
        monkeypatch.setenv("LTX2_DIGEST_TILES", tiles)
        sizes = [1, 3, 63, 64, 65, 127, 128, 129, 257, 1001]
    else:  # the default: two blocks, the second partial and odd
        sizes = [2, 4097, kernel.tiles()[0] * 2 // torch.finfo(dtype).bits * 8 + 41]
    gen = torch.Generator().manual_seed(len(sizes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]
    tensors.insert(1, torch.empty(0, dtype=dtype, device=device))  # no block: all zeros, as in torch
    tensors.append(torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype, device=device))
    assert _kernel_rows(kernel, tensors) == [tensor_digest(t.cpu()) for t in tensors]


@pytest.mark.parametrize(("shift", "unit"), [(0, 8), (2, 2), (1, 1)])  # 16-byte, 4-byte, 2-byte aligned
def test_the_kernel_reads_every_alignment(kernel, monkeypatch, shift: int, unit: int) -> None:
    monkeypatch.setenv("LTX2_DIGEST_TILES", "256,2,32,4")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat = _bf16(2000, seed=5).to(device)
    views = [flat[8 + shift:8 + shift + 301], flat[512 + shift:512 + shift + 64], flat[1024 + shift:1024 + shift + 700]]
    assert kernel.layout(views).unit == unit
    assert _kernel_rows(kernel, views) == [tensor_digest(v.cpu()) for v in views]


def test_the_kernel_declines_what_it_cannot_read(kernel) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert not kernel.fits([])
    assert not kernel.fits([torch.empty(0, device=device)])
    assert not kernel.fits([torch.zeros(4, 6, device=device).t()])  # not contiguous
    assert not kernel.fits([torch.zeros(3, dtype=torch.int8, device=device)])  # half a 16-bit word
    assert kernel.fits([torch.zeros(3, dtype=torch.bfloat16, device=device)])


@pytest.mark.parametrize("bad", ["64,2,32", "100,2,32,4", "256,3,32,4", "256,2,32,3", "a,b,c,d", "0,2,32,4",
                                 "256,1,2,4", "256,2,32,4,1"])
def test_a_bad_tile_setting_is_a_config_error(kernel, monkeypatch, bad: str) -> None:
    monkeypatch.setenv("LTX2_DIGEST_TILES", bad)
    with pytest.raises(ConfigError, match="LTX2_DIGEST_TILES"):
        kernel.tiles()


@pytest.mark.gpu
def test_the_compiled_kernel_gives_the_torch_digests_on_cuda() -> None:
    """On the GPU at LTX-2 layer sizes and odd ones, every float dtype and alignment: the
    compiled kernel against the torch path (on the GPU and on the CPU)."""
    pytest.importorskip("triton")
    from ltx2_residency.ops import digest_kernel, kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    real = [torch.randn(s, generator=gen, device="cuda").bfloat16() for s in [(4096, 4096), (2048, 8192),
                                                                                (16384, 4096)]]
    odd = [torch.randn(s, generator=gen, device="cuda").to(dt) for s in [(1, 1), (3, 5), (4097,), (65_537,),
                                                                         (130_001,), (1000, 999)] for dt in FLOATS]
    flat = torch.randn(300_000, generator=gen, device="cuda").bfloat16()
    views = [flat[1:100_001], flat[100_002:200_003]]  # 2- and 4-byte aligned: a unit-1 launch
    tensors = real + odd
    for batch in (tensors, odd + views):
        rows = _kernel_rows(digest_kernel, batch)
        assert rows == [tensor_digest(t) for t in batch]  # the torch path on the GPU
        assert kernels.digests(batch) == rows  # the same kernel through kernels' launcher
    assert rows == [tensor_digest(t.cpu()) for t in batch]  # and on the CPU
    named = {f"t{i}": t for i, t in enumerate(tensors)}
    plan = FingerprintPlan(named)
    clean = plan.compute()
    assert plan._layout is not None and plan._layout.unit == 8
    _plus1_minus2_plus1(1 << 20)(named["t0"].view(-1).view(torch.int16))
    assert clean.differing(plan.compute()) == ["t0"]
