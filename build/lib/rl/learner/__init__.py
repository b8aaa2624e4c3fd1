"""The learner: FSDP2 ranks training one PEFT LoRA adapter as a group of Ray actors, their optimizer and micro-batches."""
