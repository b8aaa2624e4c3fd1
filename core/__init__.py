"""The lowest layer, shared by rl/ and placement/: model loading, PEFT's LoRA conventions and group-relative advantages."""
