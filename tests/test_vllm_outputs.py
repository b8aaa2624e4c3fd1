"""Reading vLLM's outputs (rl/rollout/vllm_outputs.py) on vLLM's own output types, no engine.

The texts and logprobs against a real engine's own output path are checked in
tests/test_rollout.py (test_vllm_texts_and_logprobs_equal_vllms_own)."""
from __future__ import annotations

import pytest

from rl.rollout.vllm_outputs import lean_output_options, prompt_context, sampled_logprobs


def _positions(token_ids, logprobs, extra=()):
    """vLLM's per-position logprobs in both forms: dicts of Logprob, and FlatLogprobs."""
    from vllm.logprobs import FlatLogprobs, Logprob

    dicts = [{t: Logprob(logprob=lp, rank=1), **{e: Logprob(logprob=-9.0, rank=2) for e in extra}}
             for t, lp in zip(token_ids, logprobs)]
    flat = FlatLogprobs()
    for d in dicts:
        flat.append(d)
    return dicts, flat


def test_sampled_logprobs_read_dicts_and_flat_lists_alike():
    ids, lps = [5, 9, 5, 2], [-0.5, -1.25, -0.125, -3.0]
    for form in _positions(ids, lps):
        assert sampled_logprobs(form, ids) == lps
    # More than one entry per position (top-k asked): the sampled token comes first.
    for form in _positions(ids, lps, extra=(77,)):
        assert sampled_logprobs(form, ids) == lps


def test_sampled_logprobs_refuse_missing_or_foreign_entries():
    ids, lps = [5, 9, 5], [-0.5, -1.0, -2.0]
    for form in _positions(ids, lps):
        with pytest.raises(RuntimeError, match="3 logprobs for 4 tokens"):
            sampled_logprobs(form, ids + [1])
    _, flat = _positions([5, 8, 5], lps)
    with pytest.raises(RuntimeError, match="not those of the sampled tokens"):
        sampled_logprobs(flat, ids)
    with pytest.raises(RuntimeError, match="0 logprobs for 3 tokens"):
        sampled_logprobs(None, ids)


def test_prompt_context_is_the_shortest_clean_tail():
    texts = {(3, 4, 5, 6): "ok", (2, 3, 4, 5, 6): "ok"}
    decode = lambda ids: texts.get(tuple(ids), "\ufffd")  # noqa: E731 - a tail of 4 breaks here
    assert prompt_context(decode, [1, 2, 3, 4, 5, 6]) == [3, 4, 5, 6]
    assert prompt_context(lambda ids: "\ufffd" if len(ids) < 5 else "ok", [1, 2, 3, 4, 5, 6]) == [2, 3, 4, 5, 6]
    assert prompt_context(lambda ids: "\ufffd", [1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5, 6]
    assert prompt_context(lambda ids: "ok", [7, 8]) == [7, 8]


def test_lean_output_options_only_where_the_field_exists():
    assert lean_output_options(frozenset({"detokenize"})) == {"detokenize": False}
    assert lean_output_options(frozenset({"detokenize", "flat_logprobs", "n"})) == {"detokenize": False,
                                                                                    "flat_logprobs": True}
    assert lean_output_options(frozenset()) == {}


@pytest.mark.parametrize("model", ["smollm2_path", "tiny_model_path"])
def test_batch_decoder_equals_transformers_batch_decode(model, request):
    """The fast backend's decode, called directly, gives transformers' texts (special tokens
    skipped, no clean-up), special tokens and odd byte pieces included."""
    import random

    from core.models import load_tokenizer
    from rl.rollout.vllm_outputs import batch_decoder

    tok = load_tokenizer(request.getfixturevalue(model))
    assert tok.backend_tokenizer is not None  # the fast path is the one under test
    rng = random.Random(0)
    special = sorted(set(tok.all_special_ids))
    seqs = [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 60))] for _ in range(40)]
    seqs += [[special[0], *seq[:5], special[-1]] for seq in seqs[:10]] + [[], special]
    want = tok.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert batch_decoder(tok)(seqs) == want
    assert any(want) and not batch_decoder(tok)([special])[0]


def test_batch_decoder_falls_back_to_batch_decode_without_a_fast_backend():
    from rl.rollout.vllm_outputs import batch_decoder

    class Slow:  # a tokenizer with no Rust backend
        def batch_decode(self, seqs, skip_special_tokens, clean_up_tokenization_spaces):
            assert skip_special_tokens and not clean_up_tokenization_spaces
            return [" ".join(map(str, s)) for s in seqs]

    assert batch_decoder(Slow())([[1, 2], [3]]) == ["1 2", "3"]
