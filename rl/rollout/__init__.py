"""Rollout: the engine interface, the vLLM and plain-transformers engines, the worker actor, the pool, and adapter sync."""
