"""Token logprobs from the hidden states, a chunk of the output layer at a time, against the
whole-logits path: values, entropies and gradients (pure torch and the tiny Llama with PEFT)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl.config import ConfigError, config_from_dict
from rl.grpo import entropy_from_logits, token_logprobs
from rl.learner.logprobs import chunkable, head_token_logprobs, logprob_head


def _inputs(dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # right padding
    return hidden, weight, b, labels


def _lora_tiny(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    from core.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_path, "float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would leave A's gradient zero on both paths
    model.config.use_cache = False  # as the learner sets it: the shared path asks for the cache itself
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_gradients_equal_the_whole_logits(dtype, tol, chunk, bias):
    hidden, weight, b, labels = _inputs(dtype, bias)
    g_out = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=dtype)
    params = [hidden, weight] + ([b] if bias else [])

    logits = F.linear(hidden, weight, b)
    ref = token_logprobs(logits, labels, temperature=0.7)
    ref_ent = entropy_from_logits(logits.detach(), temperature=0.7)
    ref_grads = torch.autograd.grad((ref * g_out).sum(), params)

    lp, ent = head_token_logprobs(hidden, weight, labels, 0.7, chunk, bias=b, with_entropy=True)
    grads = torch.autograd.grad((lp * g_out).sum(), params)

    valid = labels >= 0
    assert lp.dtype == ref.dtype and torch.allclose(lp, ref, atol=tol, rtol=0)
    assert torch.equal(lp[~valid], torch.zeros_like(lp[~valid]))
    assert torch.allclose(ent[valid], ref_ent[valid], atol=tol * 10, rtol=0) and not ent.requires_grad
    for mine, theirs in zip(grads, ref_grads):
        assert torch.allclose(mine, theirs, atol=tol, rtol=0), (mine - theirs).abs().max()
    assert torch.equal(grads[0][~valid], torch.zeros_like(grads[0][~valid]))  # unlabelled rows get none
    # The learner passes the label count it knows on the host: the same results, bit for bit.
    counted, counted_ent = head_token_logprobs(hidden, weight, labels, 0.7, chunk, bias=b, with_entropy=True,
                                               num_labels=int(valid.sum()))
    assert torch.equal(counted, lp) and torch.equal(counted_ent, ent)
    assert all(torch.equal(m, t) for m, t in zip(torch.autograd.grad((counted * g_out).sum(), params), grads))


def test_frozen_head_gets_no_weight_gradient():
    hidden, weight, _, labels = _inputs(torch.float32, False)
    weight.requires_grad_(False)
    lp, _ = head_token_logprobs(hidden, weight, labels)
    lp.sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_bad_arguments_are_one_line_errors():
    hidden, weight, _, labels = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="learner.logprob_chunk"):
        head_token_logprobs(hidden, weight, labels, chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        head_token_logprobs(hidden, weight, labels, temperature=0)
    with pytest.raises(ConfigError, match="learner.logprob_chunk"):
        config_from_dict({"model": {"name": "x"}, "learner": {"logprob_chunk": -1}})


def test_tiny_llama_lora_gradients_equal_the_whole_logits(tiny_model_path):
    """The model's own forward with the head swapped: the LoRA gradients the learner steps on."""
    model = _lora_tiny(tiny_model_path)
    assert chunkable(model.get_base_model())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (4, 24), generator=g)
    attn = torch.ones_like(ids)
    attn[3, 18:] = 0
    labels = torch.where(attn[:, 1:].bool(), ids[:, 1:], -100)
    labels[:, :7] = -100  # the prompt: kept positions start at 7
    labels = labels[:, 7:]
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=24 - 7).logits[:, :-1]
    ref = token_logprobs(logits, labels, 0.9)
    ref_ent = entropy_from_logits(logits.detach(), 0.9)
    ref_grads = torch.autograd.grad(-ref.sum(), lora)

    with logprob_head(model, F.pad(labels, (0, 1), value=-100), 0.9, chunk=5, entropy=True):
        out = model(input_ids=ids, attention_mask=attn, logits_to_keep=24 - 7).logits[:, :-1]
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)  # the head is back
    grads = torch.autograd.grad(-out[..., 0].sum(), lora)

    valid = labels >= 0
    assert torch.allclose(out[..., 0], ref, atol=1e-5, rtol=0)
    assert torch.allclose(out[..., 1][valid], ref_ent[valid], atol=1e-4, rtol=0)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, ref_grads))
    assert worst < 1e-4, worst
    assert any(gr.abs().max() > 0 for gr in grads)


def test_models_that_transform_logits_keep_the_whole_logits_path(tiny_model_path):
    from core.models import load_model

    model = load_model(tiny_model_path, "float32")
    assert chunkable(model)
    model.config.final_logit_softcapping = 30.0
    assert not chunkable(model)


# ----------------------------------------------------------------------------- shared prompts

def _grouped_rows(seed: int = 0):
    """Two prompts (7 and 10 tokens) x 3 completions of different lengths, right-padded, and a
    row without labels (a padding row of split_batch)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 2000, (7,), generator=g), torch.randint(0, 2000, (10,), generator=g)]
    rows = [(p, torch.randint(0, 2000, (n,), generator=g)) for p in prompts for n in (5, 9, 3)]
    rows.append((prompts[0], torch.randint(0, 2000, (4,), generator=g)))
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.cat([p, c])
        attn[i, :len(p) + len(c)] = 1
        resp[i, len(p):len(p) + len(c)] = 1
    resp[-1] = 0
    labels = torch.where(resp[:, 1:].bool(), ids[:, 1:], -100)
    return ids, attn, labels


def test_split_shared_prefixes_groups_rows_by_prompt():
    from rl.learner.shared_prefix import split_shared_prefixes

    ids, attn, labels = _grouped_rows()
    split = split_shared_prefixes(ids, attn, labels)
    assert split.rows.tolist() == [0, 1, 2, 3, 4, 5]  # the unlabelled row is left out
    assert split.group.tolist() == [0, 0, 0, 1, 1, 1] and split.start.tolist() == [6, 6, 6, 9, 9, 9]
    assert split.prefix_mask.sum(dim=1).tolist() == [6, 9]
    # Each suffix is the row from its last prompt token on; its labels are the completion.
    assert torch.equal(split.suffix_ids[1, :10], ids[1, 6:16]) and split.suffix_mask[1].sum() == 10
    assert torch.equal(split.suffix_labels[1, :9], labels[1, 6:15]) and (split.suffix_labels[1, 9:] == -100).all()
    distinct = torch.stack([torch.arange(12), torch.arange(12) + 100])
    assert split_shared_prefixes(distinct, torch.ones_like(distinct), distinct[:, 1:]) is None


@pytest.mark.parametrize("chunked", [True, False])
def test_shared_prompt_forward_equals_whole_rows(tiny_model_path, chunked):
    """Logprobs, entropy and LoRA gradients of the shared-prompt forward equal the whole-row forward's."""
    from rl.learner.shared_prefix import shared_prefix_logprobs, split_shared_prefixes

    model = _lora_tiny(tiny_model_path)
    ids, attn, labels = _grouped_rows()
    lora = [p for p in model.parameters() if p.requires_grad]

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    ref = F.pad(token_logprobs(logits, labels, 0.8), (1, 0))
    valid = F.pad(labels != -100, (1, 0))
    ref_ent = entropy_from_logits(logits.detach(), 0.8)[labels != -100].sum()
    ref_grads = torch.autograd.grad(-(ref * torch.linspace(0.5, 1.5, ref.shape[1])).sum(), lora)

    def score(lab, **inputs):
        if chunked:
            with logprob_head(model, lab, 0.8, chunk=7, entropy=True):
                out = model(**inputs).logits
            return out[..., 0], out[..., 1].detach().sum()
        z = model(**inputs).logits
        return token_logprobs(z, lab, 0.8), entropy_from_logits(z.detach(), 0.8)[lab != -100].sum()

    lp, ent = shared_prefix_logprobs(model, split_shared_prefixes(ids, attn, labels), ids.shape, score)
    grads = torch.autograd.grad(-(lp * torch.linspace(0.5, 1.5, lp.shape[1])).sum(), lora)
    assert lp.shape == ref.shape and torch.equal(lp[~valid], torch.zeros_like(lp[~valid]))
    assert torch.allclose(lp, ref, atol=2e-5, rtol=0), (lp - ref).abs().max()
    assert torch.allclose(ent, ref_ent, rtol=1e-5)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, ref_grads))
    assert worst < 1e-4, worst
    assert all(g.abs().max() > 0 for g in grads)
