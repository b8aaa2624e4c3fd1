"""B masks under FSDP2 (gloo, 2 CPU ranks): mask_b_gradients on sharded DTensor gradients keeps
masked entries of B exactly zero through AdamW with weight decay, and handles uneven shards."""
from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_path: str, plan_json: str, out: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from placement import PlacementPlan, apply_plan, mask_b_gradients
    from core.models import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        plan = PlacementPlan.from_json(plan_json)
        model = apply_plan(load_model(model_path, "float32"), plan, grad_hooks=False)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(6):
            ids = torch.randint(0, 1000, (2, 16), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            mask_b_gradients(model, plan.b_masks())
            opt.step()
            opt.zero_grad()
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters() if "lora_" in n}

        # Uneven Shard(0): 7 rows over 2 ranks are chunks of 4 and 3.
        holder = nn.Module()
        holder.lora_B = nn.Parameter(distribute_tensor(torch.zeros(7, 3), mesh, [Shard(0)]))
        grad = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
        holder.lora_B.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        mask = torch.rand(7, 3, generator=torch.Generator().manual_seed(6)) < 0.5
        mask_b_gradients(holder, {"lora_B": mask})
        uneven = holder.lora_B.grad.full_tensor()
        if rank == 0:
            torch.save({"full": full, "uneven": uneven, "want": grad.masked_fill(~mask, 0)}, out)
        # Both ranks reach teardown together: a rank that tears gloo down while its peer
        # still holds the pair connection can abort the peer ("terminate called ...", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_masks_hold_under_fsdp2_sharded_gradients(tiny_model_path, tmp_path):
    from placement import AdapterSpec, PlacementPlan
    from placement.modules import candidate_modules
    from core.models import load_model

    cands = candidate_modules(load_model(tiny_model_path, "float32"), ["v_proj", "down_proj"])
    gen = torch.Generator().manual_seed(0)
    plan = PlacementPlan([AdapterSpec(m.name, 4, 8.0, mask=torch.rand(m.d_out, 4, generator=gen) < 0.3,
                                      shape=(m.d_out, m.d_in)) for m in cands], scorer="x")
    out = str(tmp_path / "result.pt")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), tiny_model_path, plan.to_json(), out), nprocs=2)
    res = torch.load(out)
    for name, mask in plan.b_masks().items():
        b = res["full"][name]
        assert torch.count_nonzero(b[~mask]) == 0, name
        assert torch.count_nonzero(b[mask]) == int(mask.sum()), name
    torch.testing.assert_close(res["uneven"], res["want"], rtol=0, atol=0)
