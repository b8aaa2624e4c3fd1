"""Probe math against independent computations: per-sample gradients against a plain
autograd loop (SFT and GRPO probes), squared norms and projected batch gradients
against the materialised G and against PEFT's own dL/dB, PAGE's closed form against a
Monte-Carlo average over sampled A, and PLoP's NFN against a direct computation."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from placement.apply import apply_plan
from placement.plan import AdapterSpec, PlacementPlan
from placement.probe import (batch_gradients, build_probe, per_sample_gradients, per_sample_sq_norms,
                             sq_frobenius_of_product)
from placement.scorers.page import page_closed_form
from placement.scorers.plop import NUM_XI, module_nfn, random_unit_vectors
from placement.modules import candidate_modules

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from core.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture()
def model(tiny_model_path):
    from core.models import load_model

    return load_model(tiny_model_path, "float32")


@pytest.fixture(scope="module")
def rows(tok, gsm8k_dir):
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()[:4]
    out = []
    for line in lines:
        r = json.loads(line)
        prompt = tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        out.append({"prompt": prompt, "answer": r["answer"]})
    return out


def _seq_nll_grad(model, ids, weights, names):
    """d/dW of sum_t weights[t] * -log p(ids[t] | ids[<t]) for one unpadded sequence, by autograd."""
    mods = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    ws = [mods[n].weight for n in names]
    for w in ws:
        w.requires_grad_(True)
        w.grad = None
    logits = model(input_ids=ids[None]).logits[0, :-1]
    nll = F.cross_entropy(logits, ids[1:], reduction="none")
    (nll * weights[1:]).sum().backward()
    return {n: w.grad.clone() for n, w in zip(names, ws)}


def test_per_sample_gradients_match_autograd_loop_sft(model, tok, rows):
    probe = build_probe(tok, rows[:3], "sft", max_tokens=160)
    got = per_sample_gradients(model, probe, MODULES, microbatch=2)
    eos = tok.eos_token_id
    for n, row in enumerate(rows[:3]):
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(row["answer"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(a) > 160:
            p = p[-max(160 - len(a), 80):]
            a = a[: 160 - len(p)]
        ids = torch.tensor(p + a)
        w = torch.zeros(len(ids))
        w[len(p):] = 1.0 / len(a)  # mean cross-entropy over the answer tokens
        want = _seq_nll_grad(model, ids, w, MODULES)
        for name in MODULES:
            torch.testing.assert_close(got[name][n], want[name], rtol=2e-4, atol=1e-7)
    assert all(got[m].abs().sum() > 0 for m in MODULES)


def test_per_sample_gradients_match_autograd_loop_grpo(model, tok, rows):
    comps = [["He sold 72 clips. #### 72", "I think 50.", "#### 72"], ["The answer is 10. #### 10", "#### 12"]]
    rewards = [[1.0, 0.0, 1.0], [1.0, 0.0]]
    grows = [{"prompt": rows[i]["prompt"], "completions": comps[i], "rewards": rewards[i]} for i in range(2)]
    probe = build_probe(tok, grows, "grpo")
    got = per_sample_gradients(model, probe, MODULES, microbatch=3)
    for n in range(2):
        r = torch.tensor(rewards[n], dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + 1e-4)  # the unbiased std, as training uses
        p = tok(rows[n]["prompt"], add_special_tokens=False)["input_ids"]
        want = {m: 0 for m in MODULES}
        for i, c in enumerate(comps[n]):
            cids = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(p + cids)
            w = torch.zeros(len(ids))
            # loss = -(1/G) sum_i A_i mean_t log p: the weight on each completion token's nll
            w[len(p):] = float(adv[i]) / len(comps[n]) / len(cids)
            g = _seq_nll_grad(model, ids, w, MODULES)
            want = {m: want[m] + g[m] for m in MODULES}
        for m in MODULES:
            torch.testing.assert_close(got[m][n], want[m], rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("max_tokens", [40, 200])  # short rows take the Gram path, long ones form G
@pytest.mark.parametrize("microbatch", [1, 3])  # one unpadded row (views), or padded rows (masked copies)
def test_sq_norms_equal_norms_of_per_sample_gradients(model, tok, rows, max_tokens, microbatch):
    probe = build_probe(tok, rows[:3], "sft", max_tokens=max_tokens)
    full = per_sample_gradients(model, probe, MODULES, microbatch=2)
    sq = per_sample_sq_norms(model, probe, MODULES, microbatch=microbatch)
    for m in MODULES:
        torch.testing.assert_close(sq[m].float(), full[m].square().sum((1, 2)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("tokens", [3, 20, 400])  # Gram route; direct at (64, 16), Gram at (48, 96); direct
@pytest.mark.parametrize("d_in,d_out", [(64, 16), (48, 96)])
def test_sq_frobenius_of_product_on_both_routes(tokens, d_in, d_out):
    gen = torch.Generator().manual_seed(tokens)
    x, g = torch.randn(tokens, d_in, generator=gen), torch.randn(tokens, d_out, generator=gen)
    want = (g.double().T @ x.double()).square().sum()
    torch.testing.assert_close(sq_frobenius_of_product(g, x).double(), want, rtol=1e-5, atol=0)


def test_microbatches_group_samples_of_similar_length(tok, rows):
    probe = build_probe(tok, rows, "sft", max_tokens=400)
    lens = sorted(len(s) for s in probe.sequences)
    assert len(set(lens)) > 1  # the rows differ in length, or the test shows nothing
    batches = list(probe.microbatches(2))
    assert sorted(s for mb in batches for s in mb.samples) == list(range(len(rows)))
    # Sorted by length, each pair pads only to its own longer row.
    assert sum(mb.input_ids.numel() for mb in batches) == sum(2 * lens[i + 1] for i in range(0, len(lens), 2))
    assert all(mb.single_row for mb in probe.microbatches(1))


def test_batch_gradients_do_not_depend_on_microbatch_size(model, tok, rows):
    probe = build_probe(tok, rows, "sft", max_tokens=200)
    one = batch_gradients(model, probe, MODULES, microbatch=1)
    three = batch_gradients(model, probe, MODULES, microbatch=3)
    for m in MODULES:
        torch.testing.assert_close(one[m], three[m], rtol=1e-4, atol=1e-7)


def test_projected_batch_gradient_is_peft_lora_b_gradient(model, tok, rows, tiny_model_path):
    from core.models import load_model

    probe = build_probe(tok, rows[:2], "sft", max_tokens=120)
    name = "model.layers.1.mlp.down_proj"
    d_out, d_in = dict(model.named_modules())[name].weight.shape
    plan = PlacementPlan([AdapterSpec(name, 4, 8.0, shape=(d_out, d_in))], scorer="test", seed=3)
    peft_model = apply_plan(load_model(tiny_model_path, "float32"), plan)
    layer = dict(peft_model.named_modules())[f"base_model.model.{name}"]
    a = layer.lora_A["default"].weight.detach().clone()
    full = batch_gradients(model, probe, [name])[name]
    proj = batch_gradients(model, probe, [name], project={name: a})[name]
    torch.testing.assert_close(proj, full @ a.T, rtol=1e-4, atol=1e-7)
    # PEFT's dL/dB at B = 0 for the same summed probe loss must be scale * G A^T.
    from placement.probe import probe_loss

    peft_model.zero_grad()
    for mb in probe.microbatches(4):
        probe_loss(peft_model, mb).backward()
    got = layer.lora_B["default"].weight.grad
    torch.testing.assert_close(got, plan.scale(plan.adapters[0]) * proj, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["fixed", "rslora"])
def test_page_closed_form_matches_monte_carlo_over_a(model, tok, rows, policy):
    probe = build_probe(tok, rows[:4], "sft", max_tokens=160)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    grads = per_sample_gradients(model, probe, names)
    rank, alpha = 8, 16.0
    scale = alpha / math.sqrt(rank) if policy == "rslora" else alpha / rank
    gen = torch.Generator().manual_seed(0)
    for name in names:
        G = grads[name]  # (N, d_out, d_in)
        d_in = G.shape[2]
        closed = page_closed_form(float(G.square().sum((1, 2)).mean()), d_in, rank, scale)
        total, draws = 0.0, 8000
        for _ in range(draws // 2000):
            A = torch.empty(2000, rank, d_in)
            for i in range(2000):
                # lora_A drawn the way PEFT initialises it.
                torch.nn.init.kaiming_uniform_(A[i], a=math.sqrt(5), generator=gen)
            total += float((scale * torch.einsum("noi,dri->ndor", G, A)).square().sum((2, 3)).sum())
        mc = total / (draws * G.shape[0])
        assert abs(mc - closed) / closed < 0.02, (name, mc, closed)


def test_nfn_matches_direct_computation(model, tok, rows):
    probe = build_probe(tok, rows[:2], "sft", max_tokens=100)
    cands = [m for m in candidate_modules(model, ["q_proj", "k_proj", "v_proj"])]
    got = module_nfn(model, probe, cands, seed=5)
    # Direct: the inputs of layer l's q/k/v are input_layernorm(hidden_states[l]), computed
    # from the model's own hidden states, no hooks involved.
    direct = {}
    with torch.no_grad():
        zs = {l: [] for l in range(2)}
        for seq in probe.sequences:
            hs = model(input_ids=seq[None], output_hidden_states=True).hidden_states
            for l in range(2):
                zs[l].append(model.model.layers[l].input_layernorm(hs[l])[0])
        for m in cands:
            z = torch.cat(zs[m.layer])
            z = z[z.norm(dim=1) > 0]
            w = dict(model.named_modules())[m.name].weight
            wbar = w / w.square().mean().sqrt()
            num = (z / z.norm(dim=1, keepdim=True) @ wbar.T).norm(dim=1).mean()
            xi = random_unit_vectors(NUM_XI, m.d_in, 5)
            den = (xi @ wbar.T).norm(dim=1).mean()
            direct[m.name] = float(num / den)
    for name, v in direct.items():
        assert got[name] == pytest.approx(v, rel=1e-4), name
    assert len(set(round(v, 6) for v in got.values())) > 1  # the scores tell modules apart


def test_probe_rows_are_validated_in_one_line(tok, rows):
    with pytest.raises(ValueError, match="probe row 0 has no 'answer'"):
        build_probe(tok, [{"prompt": "hi"}], "sft")
    with pytest.raises(ValueError, match="needs 'completions' and as many 'rewards'"):
        build_probe(tok, [{"prompt": "hi", "completions": ["a", "b"], "rewards": [1.0]}], "grpo")
    with pytest.raises(ValueError, match="placement.probe_source='rl'"):
        build_probe(tok, rows, "rl")
    probe = build_probe(tok, rows, "sft", max_tokens=64)
    assert all(len(s) <= 64 for s in probe.sequences) and probe.num_samples == len(rows)
    assert [p.num_samples for p in probe.split(3)] == [1, 2, 1]
    with pytest.raises(ValueError, match="cannot split a probe of 4 samples into 5 steps"):
        probe.split(5)
