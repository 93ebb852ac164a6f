import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ltx2_residency import Fingerprint
from ltx2_residency.ops.fingerprint import FingerprintPlan, tensor_digest


def _bf16(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


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


@given(n=st.integers(1, 200_000), i=st.integers(0, 10**9), bit=st.integers(0, 15))
def test_any_single_bit_flip_is_detected(n: int, i: int, bit: int) -> None:
    t = _bf16(n)
    flipped = t.clone()
    flipped.view(torch.int16)[i % n] ^= (1 << bit) if bit < 15 else -(1 << 15)
    assert tensor_digest(t) != tensor_digest(flipped)


@given(n=st.integers(2, 200_000), i=st.integers(0, 10**9), j=st.integers(0, 10**9))
def test_swapping_two_different_words_is_detected(n: int, i: int, j: int) -> None:
    t = _bf16(n, seed=1)
    i, j = i % n, j % n
    words = t.view(torch.int16)
    if i == j or words[i] == words[j]:
        return
    swapped = t.clone()
    sw = swapped.view(torch.int16)
    sw[i], sw[j] = words[j].clone(), words[i].clone()
    assert tensor_digest(t) != tensor_digest(swapped)


def test_a_plain_sum_would_miss_what_the_digest_catches() -> None:
    t = _bf16(70_000)
    moved = t.clone()
    w = moved.view(torch.int16)
    w[5] += 1
    w[65_541] -= 1  # same in-block offset, next block: cancels in the plain and in-block sums
    assert int(t.view(torch.int16).long().sum()) == int(moved.view(torch.int16).long().sum())
    assert tensor_digest(t) != tensor_digest(moved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_digest_is_stable_and_dtype_agnostic(dtype: torch.dtype) -> None:
    t = (torch.randn(33, 17) * 10).to(dtype)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t.t().contiguous()) != tensor_digest(t) or t.numel() == 0


def test_fingerprint_reports_which_tensors_differ() -> None:
    ws = {"a": _bf16(10), "b": _bf16(10, 2), "c": _bf16(10, 3)}
    clean = Fingerprint.of(ws.items())
    ws["b"] = ws["b"].clone()
    ws["b"][0] += 1
    assert clean.differing(Fingerprint.of(ws.items())) == ["b"]
    assert len(clean) == 3


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
