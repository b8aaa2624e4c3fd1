"""The model a learner rank trains: the base model with its LoRA adapter (a placement plan's,
or a plain LoraConfig's), and the B masks that restrict which entries of B train."""
from __future__ import annotations

import torch

from core.lora import check_lora_shapes


def adapted_model(cfg, model_path: str, lora_config: dict, b_masks, plan):
    """The base model with its LoRA adapter (the plan's, or ``lora_config``'s), and the B masks."""
    from peft import LoraConfig, get_peft_model

    from core.models import load_model

    # The same seed on every rank: each rank builds the full model and fully_shard keeps
    # its slice, so LoRA's random A must be identical everywhere.
    torch.manual_seed(cfg.trainer.seed)
    model = load_model(model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    model.config.use_cache = False
    if cfg.learner.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if plan is not None:
        from placement import apply_plan

        # The plan's own A (seeded per module) is the A its B masks were scored for.
        peft_model = apply_plan(model, plan, grad_hooks=False)
        b_masks = b_masks or plan.b_masks()
    else:
        lora_config = {"task_type": "CAUSAL_LM", **{k: v for k, v in lora_config.items() if v is not None}}
        peft_model = get_peft_model(model, LoraConfig(**lora_config))
        check_lora_shapes(peft_model, lora_config)
    if b_masks:
        # A B-masked module trains only its unmasked B entries; its A stays as initialised.
        params = dict(peft_model.named_parameters())
        for name in b_masks:
            if name not in params:
                raise ValueError(f"B mask for {name!r} names no parameter of the PEFT model; masks are "
                                 "keyed by lora_B parameter names (PlacementPlan.b_masks())")
            params[name.replace("lora_B", "lora_A")].requires_grad_(False)
    return peft_model, b_masks
