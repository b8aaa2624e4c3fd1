"""vLLM's request outputs as :class:`Completion` rows, with no per-token host work while decoding.

By default vLLM's output processor does Python work for every sequence at every decode
step: an incremental detokenizer step, the sampled token's string for its logprob entry,
and a dict of ``Logprob`` objects per position. With the engine in the worker's process
that work sits on each decode step's critical path, and it grows with the batch. The
engine asks for none of it (:func:`lean_output_options`):

- ``detokenize=False``; the texts are decoded once per call afterwards
  (:func:`decode_texts`), the way vLLM's detokenizer writes them: special tokens skipped,
  no clean-up of spaces, the stop token left out of a completion that stopped on it, and
  the first token decoded after a few prompt tokens (a SentencePiece tokenizer drops the
  leading space of a token that starts a text);
- ``flat_logprobs=True`` where the installed vLLM has it: a few flat lists per completion
  instead of a dict per position (:func:`sampled_logprobs` reads both forms).
"""
from __future__ import annotations

from rl.rollout.engine import Completion


def sampling_param_fields() -> frozenset[str]:
    """The fields of the installed vLLM's ``SamplingParams`` (a msgspec struct)."""
    import dataclasses

    from vllm import SamplingParams

    names = getattr(SamplingParams, "__struct_fields__", None)
    if names is None:
        names = [f.name for f in dataclasses.fields(SamplingParams)]
    return frozenset(names)


def lean_output_options(fields: frozenset[str] | None = None) -> dict:
    """SamplingParams options that skip vLLM's per-token output work, each where it exists."""
    fields = sampling_param_fields() if fields is None else fields
    options = {}
    if "detokenize" in fields:
        options["detokenize"] = False
    if "flat_logprobs" in fields:
        options["flat_logprobs"] = True
    return options


def sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """The logprob of each sampled token, from vLLM's per-position logprobs (``logprobs=0``):
    flat lists (``FlatLogprobs``) or a list of ``{token id: Logprob}`` dicts."""
    n = 0 if logprobs is None else len(logprobs)
    if n != len(token_ids):
        raise RuntimeError(f"vLLM returned {n} logprobs for {len(token_ids)} tokens")
    starts = getattr(logprobs, "start_indices", None)
    if starts is None:
        return [float(pos[tok].logprob) for pos, tok in zip(logprobs, token_ids)]
    flat_ids, flat_lps = logprobs.token_ids, logprobs.logprobs
    if len(flat_lps) == len(token_ids):  # logprobs=0: one entry per position, the sampled token's
        if flat_ids != token_ids:
            raise RuntimeError("vLLM's flat logprobs are not those of the sampled tokens")
        return [float(x) for x in flat_lps]
    # vLLM puts the sampled token first at each position.
    if [flat_ids[s] for s in starts] != token_ids:
        raise RuntimeError("vLLM's flat logprobs are not those of the sampled tokens")
    return [float(flat_lps[s]) for s in starts]


def prompt_context(decode, prompt_ids: list[int]) -> list[int]:
    """The prompt tokens a completion's text is decoded after, chosen as vLLM's detokenizer
    chooses them: the shortest tail of 4 to 23 tokens that decodes without a broken character,
    the whole prompt when it is shorter."""
    if len(prompt_ids) <= 4:
        return list(prompt_ids)
    for i in range(4, min(len(prompt_ids) + 1, 24)):
        tail = list(prompt_ids[-i:])
        if "\ufffd" not in decode(tail):
            return tail
    return list(prompt_ids)


def batch_decoder(tokenizer):
    """``decode(list of token-id lists) -> texts``, special tokens skipped, no clean-up of spaces.

    transformers' ``batch_decode`` walks every token id in Python (a type check per id) before
    its Rust tokenizer decodes them: for a GRPO batch (512 completions of about 300 tokens) that
    walk took half of the decode on CPU. A fast tokenizer's backend is called directly instead;
    transformers' own decode is the same call followed by the clean-up left off here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
    return lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_texts(tokenizer, prompt_ids: list[list[int]], rows: list[list[tuple[list[int], bool]]]) -> list[list[str]]:
    """The text of each completion, ``rows[prompt][sample] = (token ids, stopped on a stop token)``,
    as vLLM's ``CompletionOutput.text`` writes it; decoded in one batch."""
    decode = batch_decoder(tokenizer)
    contexts = [prompt_context(lambda ids: decode([ids])[0], p) for p in prompt_ids]
    heads = decode(contexts)
    bodies = [[ids[:-1] if stopped else ids for ids, stopped in row] for row in rows]
    fulls = iter(decode([ctx + body for ctx, row in zip(contexts, bodies) for body in row]))
    texts = []
    for head, row in zip(heads, bodies):
        out = []
        for body in row:
            full = next(fulls)
            # A context whose text changes once tokens follow it (rare) cannot be cut off:
            # then the completion is decoded alone.
            out.append(full[len(head):] if full.startswith(head) else decode([body])[0])
        texts.append(out)
    return texts


def completion_rows(tokenizer, prompt_ids: list[list[int]], outputs, decoded: bool) -> list[list[Completion]]:
    """``[prompt][sample]`` Completions from vLLM's RequestOutputs (in prompt order); texts
    decoded here unless vLLM ``decoded`` them."""
    samples = [sorted(o.outputs, key=lambda c: c.index) for o in outputs]
    if decoded:
        texts = [[c.text for c in row] for row in samples]
    else:
        texts = decode_texts(tokenizer, prompt_ids,
                             [[(list(c.token_ids), c.finish_reason == "stop") for c in row] for row in samples])
    rows = []
    for row, row_texts in zip(samples, texts):
        out = []
        for c, text in zip(row, row_texts):
            ids = list(c.token_ids)
            reason = c.finish_reason if c.finish_reason in ("stop", "length") else str(c.finish_reason)
            out.append(Completion(token_ids=ids, logprobs=sampled_logprobs(c.logprobs, ids), text=text,
                                  finish_reason=reason))
        rows.append(out)
    return rows
