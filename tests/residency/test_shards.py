"""Sharded weights merged where they live (``ops.shards``): tensor parallelism (``parallelize_module``,
colwise and rowwise) and FSDP2 (``fully_shard``) on real gloo groups of spawned processes, each
rank's manager against an unsharded manager of the same DiT in the same process."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import LoRASpec, ManagerOptions, ResidencyManager
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits
from ranks import run_ranks

STAGE2 = {"stage1": 0.0, "stage2": 1.0}
COLWISE, ROWWISE = "ff.net.0.proj", "ff.net.2"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    dit = tiny_transformer(seed=0)
    return save_lora(tmp_path_factory.mktemp("shards") / "distilled.safetensors",
                     synthetic_lora(dit, linear_names(dit), rank=4, seed=1))


def _tensor_parallel(dit: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    plan: dict[str, Any] = {}
    for i in range(len(dit.transformer_blocks)):
        plan[f"transformer_blocks.{i}.{COLWISE}"] = ColwiseParallel()
        plan[f"transformer_blocks.{i}.{ROWWISE}"] = RowwiseParallel()
    parallelize_module(dit, mesh, plan)


def _fully_sharded(dit: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in dit.transformer_blocks:
        # kept gathered between calls: a merge must make FSDP2 gather the written shards again
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(dit, mesh=mesh)


def _managers(dit: torch.nn.Module, ref: torch.nn.Module, path: str, policy: str
              ) -> tuple[ResidencyManager, ResidencyManager]:
    spec = [LoRASpec("distilled", path=path, strengths=STAGE2)]
    return (ResidencyManager(dit, "original", spec, policy, process_group=dist.group.WORLD,
                             options=ManagerOptions(collective_timeout=60)),
            ResidencyManager(ref, "original", spec, policy))


def sharded_requests(rank: int, world: int, path: str, layout: str) -> dict[str, Any]:
    dit, ref = tiny_transformer(seed=0), tiny_transformer(seed=0)
    (_tensor_parallel if layout == "tp" else _fully_sharded)(dit, world)
    inputs = tiny_inputs(ref, seed=0)
    with torch.no_grad():
        base = dit(**inputs)[0].float()
        base_gap = (base - ref(**inputs)[0].float()).abs().max().item()
    out: dict[str, Any] = {"base_gap": base_gap}
    for policy in ("merge", "dynamic"):
        mgr, ref_mgr = _managers(dit, ref, path, policy)
        clean = weight_bits(mgr.managed_weights)
        mine = {n: tuple(w.shape) for n, w in mgr.managed_weights.items()}
        whole = {n: tuple(w.shape) for n, w in ref_mgr.managed_weights.items()}
        with torch.no_grad(), mgr.request() as req, ref_mgr.request() as ref_req:
            req.enter("stage1")(**inputs)
            ref_req.enter("stage1")(**inputs)
            got = req.enter("stage2")(**inputs)[0].float()
            want = ref_req.enter("stage2")(**inputs)[0].float()
            if policy == "merge":  # each rank's block is the block of the whole merged weight, bit for bit
                blocks = []
                for name, w in mgr.managed_weights.items():
                    full = ref_mgr.managed_weights[name]
                    rows, cols = w.shape
                    r0 = rank * rows if rows != full.shape[0] else 0
                    c0 = rank * cols if cols != full.shape[1] else 0
                    blocks.append(torch.equal(w, full[r0:r0 + rows, c0:c0 + cols]))
                out["blocks_equal"] = all(blocks)
        out[policy] = {"gap": (got - want).abs().max().item(), "lora_effect": (got - base).abs().max().item(),
                       "clean": all(torch.equal(clean[n], b) for n, b in weight_bits(mgr.managed_weights).items())}
        out["sharded"] = sorted(n for n in mine if mine[n] != whole[n])
        out["local_bytes"] = mgr.memory()["managed_weight_bytes"]
        out["whole_bytes"] = ref_mgr.memory()["managed_weight_bytes"]
        mgr.close()
        ref_mgr.close()
    with torch.no_grad():
        out["after_gap"] = (dit(**inputs)[0].float() - base).abs().max().item()
    return out


@pytest.mark.parametrize("layout", ["tp", "fsdp2"])
def test_each_rank_merges_and_undoes_its_own_shard(lora_file: str, layout: str) -> None:
    for r in run_ranks(2, sharded_requests, lora_file, layout):
        if layout == "tp":
            assert r["sharded"] and all(n.endswith((COLWISE, ROWWISE)) for n in r["sharded"])
        else:
            assert r["sharded"]
        assert r["local_bytes"] < r["whole_bytes"]  # no rank holds a whole sharded weight
        assert r["blocks_equal"]  # merged in place, block by block, as the whole weight merges
        for policy in ("merge", "dynamic"):
            assert r[policy]["clean"]  # exact undo per shard
            # the sharded DiT against the whole one: as close as their base outputs, LoRA applied
            assert r[policy]["gap"] <= max(2 * r["base_gap"], 0.02), (policy, r)
            assert r[policy]["lora_effect"] > 10 * max(r[policy]["gap"], 1e-3), (policy, r)
        assert r["after_gap"] == 0.0  # closed: the sharded DiT computes exactly as before
