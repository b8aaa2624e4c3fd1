"""How a learner rank shards its PEFT model with FSDP2: per decoder layer and at the root,
bf16 compute under fp32 masters on CUDA, and gradients summed (not averaged) across ranks,
because the loss pieces are already normalised by the global token and sequence counts."""
from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    # transformers names its repeated block classes in _no_split_modules (LlamaDecoderLayer...).
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no decoder-layer class in _no_split_modules; "
                         "FSDP2 needs one to shard per layer")
    return layers


def shard_model(peft_model, device: torch.device, world_size: int, mixed_precision: str, cuda: bool) -> None:
    """FSDP2 over the decoder layers and the whole model, gradients summed across ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" or (mixed_precision == "auto" and cuda) else MixedPrecisionPolicy()
    peft_model.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    # One rank has nothing to shard: resharding after forward would only free the bf16 copy
    # of the weights and cost a second gather (cast) in backward.
    reshard = world_size > 1
    for layer in decoder_layers(peft_model.base_model.model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(peft_model, mesh=mesh, mp_policy=policy)
    for m in peft_model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def reshard(model) -> None:
    """Free every FSDP2 module's gathered weights (the next forward gathers the updated ones)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
