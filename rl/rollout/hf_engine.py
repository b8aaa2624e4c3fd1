"""The plain-transformers rollout engine: batched sampling with a KV cache.

For hosts without vLLM (and, later, the GPU path where vLLM is not installed). All
n completions of all prompts decode together as one left-padded batch: each prompt is
prefilled once and its KV cache copied for its n completions, then one forward per
new token with the cache. Sequences that reach an eos token drop out of the batch
once they are half of it, so the only Python work per token is the decode loop itself.

Sampling follows vLLM's definitions so that both engines report the same logprobs:
temperature divides the logits, top-p masks the tokens outside the nucleus (vLLM's
rule: drop the tokens whose ascending cumulative probability stays <= 1 - p), and
the logprob is taken from that processed distribution; greedy reports the raw
log-softmax. Stopping is on the model's eos ids (tokenizer eos plus the
``generation_config`` ones), as vLLM does.

The adapter is applied by building a PEFT model once and loading each new version's
tensors into it in place; a changed LoRA config rebuilds it (unload, then wrap again).

Left out: continuous batching, paged attention, CUDA graphs.
"""
from __future__ import annotations

import torch

from rl.rollout.engine import Completion, SamplingSpec, check_prompts, prompt_seed
from core.lora import lora_config_from_dict
from rl.rollout.sync import AdapterPayload, check_ranks, check_unfolded


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """vLLM's top-p: -inf outside the nucleus, at least one token kept (rows of logits)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, idx, sorted_logits)


def pick_tokens(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator | None):
    """(token ids, their logprobs) for one decode step; logits are (batch, vocab)."""
    logits = logits.float()
    if spec.temperature == 0:
        logp = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = top_p_mask(logits / spec.temperature, spec.top_p).log_softmax(dim=-1)
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _default_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


class HFEngine:
    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int,
                 device: str | None = None, max_batch_sequences: int = 256):
        from transformers import GenerationConfig

        from core.models import load_model, load_tokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_path, _default_dtype(dtype, self.device)).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_path)
        self.max_model_len = rollout_cfg.max_model_len
        self.max_lora_rank = rollout_cfg.max_lora_rank
        self.max_batch = max_batch_sequences
        stop = {self.tokenizer.eos_token_id}
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json
            eos = self.model.config.eos_token_id
        stop |= set([eos] if isinstance(eos, int) else (eos or []))
        stop.discard(None)
        self.stop_ids = torch.tensor(sorted(stop), device=self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._peft = None
        self._peft_config: dict | None = None
        self._version: int | None = None

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        sampling.validate()
        check_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens)
        gen = self._generator
        if sampling.seed is not None:  # one stream for the call, keyed by its first prompt's place
            gen = torch.Generator(self.device).manual_seed(prompt_seed(sampling.seed, sampling.prompt_offset, sampling.n))
        # Greedy completions of one prompt are identical: decode one and repeat it.
        copies = 1 if sampling.temperature == 0 else sampling.n
        per_chunk = max(1, self.max_batch // copies)
        results = []
        for start in range(0, len(prompt_ids), per_chunk):
            results += self._decode(prompt_ids[start:start + per_chunk], copies, sampling, gen)
        texts = self.tokenizer.batch_decode([r[0] for r in results], skip_special_tokens=True)
        done = [Completion(ids, lps, text, reason) for (ids, lps, reason), text in zip(results, texts)]
        return [done[i * copies:(i + 1) * copies] * (sampling.n // copies) for i in range(len(prompt_ids))]

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], copies: int, spec: SamplingSpec, gen) -> list[tuple]:
        """``copies`` completions of each prompt, prompt-major: (token ids, logprobs, finish reason)."""
        width, steps, dev = max(len(p) for p in prompts), spec.max_new_tokens, self.device
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        # Left padding: positions count real tokens only, as they would unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Each prompt is prefilled once; its KV cache is then copied for its n completions.
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = positions[:, -1:] + 1
        if copies > 1:
            cache.batch_repeat_interleave(copies)
            logits, mask, next_pos = (x.repeat_interleave(copies, dim=0) for x in (logits, mask, next_pos))
        total = len(prompts) * copies
        tokens = torch.full((total, steps), self.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((total, steps), dtype=torch.float32, device=dev)
        lengths = torch.full((total,), steps, dtype=torch.long, device=dev)
        rows = torch.arange(total, device=dev)  # which sequence each batch row decodes
        active = torch.ones(total, dtype=torch.bool, device=dev)
        for t in range(steps):
            tok, lp = pick_tokens(logits, spec, gen)
            # Rows that finished earlier get pad / 0 here, beyond their length: no masked
            # indexing, so the step costs one device sync (the count below), not several.
            tokens[rows, t] = torch.where(active, tok, self.pad_id)
            logprobs[rows, t] = torch.where(active, lp, 0.0)
            hit = torch.isin(tok, self.stop_ids) & active
            lengths[rows] = torch.where(hit, t + 1, lengths[rows])
            active &= ~hit
            n_active = int(active.sum())
            if t + 1 == steps or n_active == 0:
                break
            # Finished rows stop costing compute once they are half the batch (a cache
            # copy each time, so not on every single stop).
            if 2 * n_active <= len(rows):
                keep = active.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, tok, mask, next_pos, active = rows[keep], tok[keep], mask[keep], next_pos[keep], active[keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                             past_key_values=cache, use_cache=True)
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1, :], next_pos + 1
        tokens, logprobs, lengths = tokens.cpu(), logprobs.cpu(), lengths.cpu()
        # A sequence stopped iff its last kept token is an eos id (lengths < steps, or eos at the last step).
        stop = set(self.stop_ids.tolist())
        return [(tokens[i, :lengths[i]].tolist(), logprobs[i, :lengths[i]].tolist(),
                 "stop" if int(tokens[i, lengths[i] - 1]) in stop else "length") for i in range(total)]

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, payload: AdapterPayload) -> None:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        check_unfolded(payload)
        # Same cap as the vLLM engine, so that a run behaves the same whichever engine serves it.
        check_ranks(payload.peft_config, self.max_lora_rank, payload.tensors)
        if self._peft is None or payload.peft_config != self._peft_config:
            base = self.model if self._peft is None else self._peft.unload()
            self._version = None  # a fresh wrap has B = 0: the base model, whatever comes next
            config = lora_config_from_dict(payload.peft_config)
            config.inference_mode = True
            self._peft = get_peft_model(base, config).eval()
            self.model = self._peft
            self._peft_config = dict(payload.peft_config)
        expected = set(get_peft_model_state_dict(self._peft))
        given = set(payload.tensors)
        if expected != given:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise ValueError(f"adapter version {payload.version} does not fit its LoRA config: "
                             f"{len(missing)} tensors missing (e.g. {missing[:1]}), "
                             f"{len(extra)} unexpected (e.g. {extra[:1]}); send the full adapter")
        set_peft_model_state_dict(self._peft, payload.tensors)
        self._version = payload.version

    def adapter_version(self) -> int | None:
        return self._version
