"""What a learner rank hands out and takes back: its adapter, and the state a checkpoint holds.

A mixin of :class:`rl.learner.rank.LearnerRank`: every method here is a collective (each rank
calls it; FSDP2 gathers the shards), and rank 0 returns the result.
"""
from __future__ import annotations

import torch

from core.lora import full_tensor


class RankState:
    """Adapter export and checkpoint state of a LearnerRank (``self.model``, ``self.optimizer``,
    ``self.scheduler``, ``self.rank``, ``self.world_size``, ``self.steps``, ``self.updates``)."""

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Full LoRA tensors under the model's parameter names (collective)."""
        return {n: full_tensor(p).cpu().clone() for n, p in self.model.named_parameters() if "lora_" in n}

    def export_adapter(self, version: int, serve_dtype: str | None = None, on_device: bool = False):
        """The adapter as an AdapterPayload on rank 0 (collective); None elsewhere.
        ``serve_dtype``: folded for vLLM and cast to that dtype (rl/rollout/sync.py).
        ``on_device``: left on rank 0's GPU, in buffers this rank keeps, for workers that
        share the GPU (rl/rollout/device_handoff.py)."""
        from rl.rollout.device_handoff import DeviceBuffers
        from rl.rollout.sync import make_payload

        dtype = getattr(torch, serve_dtype) if serve_dtype else None
        buffers = None
        if on_device and self.rank == 0:  # kept from one export to the next: the workers keep its handle open
            buffers = self._device_buffers = getattr(self, "_device_buffers", None) or DeviceBuffers()
        payload = make_payload(self.model, version, serve_dtype=dtype, device_buffers=buffers)
        return payload if self.rank == 0 else None

    def gpu_uuid(self) -> str | None:
        """The UUID of this rank's GPU; None on CPU."""
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)

    def state_for_save(self) -> dict | None:
        """Everything a checkpoint holds, gathered to rank 0 (collective); None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        payload = self.export_adapter(self.updates)
        optim = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {"adapter": payload, "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "counters": {"steps": self.steps, "updates": self.updates, "world_size": self.world_size}}

    def load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # PEFT's files drop the adapter name from the keys; the live model has ".default.".
        by_file_key = {n.replace(".default", ""): n for n, _ in self.model.named_parameters() if "lora_" in n}
        missing = sorted(set(by_file_key) - set(state["adapter"]))
        if missing:
            raise ValueError(f"checkpoint adapter lacks {len(missing)} LoRA tensors (e.g. {missing[0]}); "
                             "it was saved with a different placement/LoRA config")
        sd = {by_file_key[k]: v for k, v in state["adapter"].items()}
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, sd, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps, self.updates = state["counters"]["steps"], state["counters"]["updates"]
