"""sample.py: decoding strategies against independent references (full recomputation, brute-force
enumeration, hand-computed filters, exact target distributions), streaming, and the CLI."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import sample
from common import save_checkpoint
from model import ModelConfig, Transformer
from chat import prompt_ids, render_chatml
from decoding import beam_search, speculative_generate
from sample import (SamplingParams, TextStream, apply_penalties, generate, left_pad, min_p_filter, top_k_filter,
                    top_p_filter, typical_filter)

INF = float("inf")


def make_model(seed=0, std=0.3, **overrides):
    """A tiny random model; weights with std 0.3 so its distributions are peaked (no near-ties in argmax)."""
    torch.manual_seed(seed)
    config = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = Transformer(ModelConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def greedy_reference(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence without any cache, one token at a time."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


def sequence_logprobs(model, prompt, continuations):
    """log P(continuation | prompt) for equally long continuations, from one full forward pass."""
    seqs = torch.tensor([list(prompt) + list(c) for c in continuations])
    with torch.no_grad():
        logprobs = F.log_softmax(model(seqs)[0].double(), -1)[:, len(prompt) - 1:-1]   # (N, n, V)
    return logprobs.gather(-1, seqs[:, len(prompt):, None]).sum((1, 2)).tolist()


def sequence_logprob(model, prompt, continuation):
    return sequence_logprobs(model, prompt, [continuation])[0]


def chi_square(counts: dict, expected_probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 draws are pooled into one."""
    small = [c for c in expected_probs if expected_probs[c] * n < 5]
    cells = [[c] for c in expected_probs if c not in small] + ([small] if small else [])
    stat = 0.0
    for cell in cells:
        expected = n * sum(expected_probs[c] for c in cell)
        observed = sum(counts.get(c, 0) for c in cell)
        stat += (observed - expected) ** 2 / max(expected, 1e-12)
    return stat, len(cells) - 1


def chi_square_critical_001(df: int) -> float:
    """The 0.1% upper quantile of chi-square(df), Wilson-Hilferty approximation (within 1% for df >= 3)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ----------------------------------------------------------------------------------------------------------
# Logit transforms on hand-made logits

def kept(logits):
    return set((logits[0] > -INF).nonzero().flatten().tolist())


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert kept(top_k_filter(logits, 1)) == {1, 2}          # two tied maxima: both kept
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 3)) == {1, 2, 3}
    assert kept(top_k_filter(logits, 5)) == {0, 1, 2, 3, 4}
    assert kept(top_k_filter(torch.tensor([[3.0, 1.0, 2.0, 2.0]]), 2)) == {0, 2, 3}  # tie at the k-th
    out = top_k_filter(logits, 3)
    assert torch.equal(out[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # kept logits unchanged


def test_top_p_keeps_the_smallest_nucleus_with_ties_and_always_the_top_token():
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()     # probabilities 0.5, 0.2, 0.2, 0.1
    assert kept(top_p_filter(logits, 0.01)) == {0}           # the top token always stays
    assert kept(top_p_filter(logits, 0.45)) == {0}
    assert kept(top_p_filter(logits, 0.55)) == {0, 1, 2}     # 0.5 + one of the tied 0.2s reaches 0.55: both tied kept
    assert kept(top_p_filter(logits, 0.75)) == {0, 1, 2}
    assert kept(top_p_filter(logits, 0.95)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(torch.tensor([[0.4, 0.4, 0.2]]).log(), 0.3)) == {0, 1}   # tied top tokens
    # the tokens are found by probability, not position; rows are independent
    rows = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]).log()
    out = top_p_filter(rows, 0.8)
    assert (out > -INF).tolist() == [[False, True, True], [True, True, False]]


def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability():
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    assert kept(min_p_filter(logits, 0.3)) == {0, 1, 2}      # threshold 0.15
    assert kept(min_p_filter(logits, 0.5)) == {0}            # threshold 0.25
    assert kept(min_p_filter(logits, 0.0)) == {0, 1, 2, 3}
    assert kept(min_p_filter(logits, 1.0)) == {0}


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    out = apply_penalties(logits, seen, counts, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    out = apply_penalties(logits, seen, counts, frequency_penalty=0.5, presence_penalty=0.25)
    assert out.tolist() == [[2.0, -1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25, 3.0]]


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                 dict(min_p=1.5), dict(repetition_penalty=0.0)])
def test_invalid_sampling_parameters_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_sampled_frequencies_match_the_filtered_distribution():
    """4,000 rows of one prompt, one token each: frequencies follow softmax(top-k(logits / T))."""
    model = make_model(std=0.15)
    prompt = [3, 1, 4, 1, 5]
    params = dict(temperature=0.7, top_k=6)
    n = 4000
    out = torch.stack(generate(model, [prompt] * n, 1, seed=0, **params)).flatten()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][:, -1]
    probs = top_k_filter(logits / 0.7, 6).softmax(-1)[0]
    assert set(out.tolist()) <= set(probs.nonzero().flatten().tolist())   # nothing outside the top-k
    expected = {i: probs[i].item() for i in range(len(probs)) if probs[i] > 0}
    stat, df = chi_square(dict(zip(*[t.tolist() for t in out.unique(return_counts=True)])), expected, n)
    assert stat < chi_square_critical_001(df)


def test_seed_makes_sampling_reproducible():
    model = make_model(std=0.1)
    a = generate(model, [1, 2, 3], 20, temperature=1.0, seed=7)[0]
    b = generate(model, [1, 2, 3], 20, temperature=1.0, seed=7)[0]
    c = generate(model, [1, 2, 3], 20, temperature=1.0, seed=8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------
# Generation on the KV cache

def test_greedy_with_kv_cache_equals_full_recomputation():
    model = make_model()
    for prompt in ([7], [5, 9, 2, 33, 1, 8, 8]):
        expected = greedy_reference(model, prompt, 30)
        assert generate(model, prompt, 30, temperature=0)[0].tolist() == expected
        assert generate(model, prompt, 30, temperature=0, use_cache=False)[0].tolist() == expected


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = make_model()
    prompts = [[5, 9, 2, 33, 1, 8, 8], [4], [60, 61, 0, 2], [0, 0, 7, 1, 3, 12, 14, 15, 9, 22]]
    batched = generate(model, prompts, 20, temperature=0)
    for prompt, out in zip(prompts, batched):
        assert out.tolist() == greedy_reference(model, prompt, 20)
    # penalties count each row's own prompt, never the padding (and batches without padding work too)
    for batch in (prompts, [[5, 9, 2], [4, 4, 4]]):
        penalised = generate(model, batch, 20, temperature=0, repetition_penalty=1.5, presence_penalty=0.3)
        for prompt, out in zip(batch, penalised):
            assert torch.equal(out, generate(model, prompt, 20, temperature=0, repetition_penalty=1.5,
                                             presence_penalty=0.3)[0])


def test_repetition_penalty_changes_greedy_output_as_computed_by_hand():
    """Greedy with penalties equals a reference loop that applies the formulas to full-recompute logits."""
    model = make_model()
    prompt, r, f, p = [5, 9, 2], 1.8, 0.4, 0.2
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            logits = model(torch.tensor([seq]))[0][0, -1].tolist()
            generated = seq[len(prompt):]
            for t in range(len(logits)):
                if t in seq:
                    logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
                logits[t] -= f * generated.count(t) + p * (t in generated)
            seq.append(max(range(len(logits)), key=logits.__getitem__))
    out = generate(model, prompt, 15, temperature=0, repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
    assert out[0].tolist() == seq[len(prompt):]
    assert out[0].tolist() != greedy_reference(model, prompt, 15)


@pytest.mark.slow
def test_compiled_decoding_equals_eager():
    """torch.compile (freezing, C++ wrapper) on the decode step: same greedy tokens, padded batches too."""
    model = make_model()
    prompts = [[5, 9, 2, 33, 1, 8, 8], [4], [60, 61, 0, 2]]
    for batch in (prompts[:1], prompts):
        eager = generate(model, batch, 20, temperature=0)
        assert all(torch.equal(a, b) for a, b in zip(eager, generate(model, batch, 20, temperature=0, compile=True)))


def test_stop_tokens_end_each_row_separately():
    model = make_model()
    prompts = [[5, 9, 2], [4, 4]]
    free = generate(model, prompts, 12, temperature=0)
    stop = free[0][4].item()   # the 5th token of row 0
    stopped = generate(model, prompts, 12, temperature=0, stop_tokens=[stop])
    for full, out in zip(free, stopped):
        hits = (full == stop).nonzero().flatten().tolist()
        assert out.tolist() == full[:hits[0]].tolist() if hits else torch.equal(out, full)
    assert len(stopped[0]) == free[0].tolist().index(stop)


def test_context_limits():
    model = make_model(max_seq_len=16)
    assert len(generate(model, list(range(13)), 10, temperature=0)[0]) == 3   # stops when the context is full
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, list(range(16)), 1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], 1)


def test_left_pad():
    ids, pad_lens = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and pad_lens.tolist() == [0, 2]
    ids, pad_lens = left_pad(torch.tensor([[1, 2], [3, 4]]))
    assert ids.tolist() == [[1, 2], [3, 4]] and pad_lens is None


# ----------------------------------------------------------------------------------------------------------
# The sampling options against transformers' logits processors, on random logits

@pytest.mark.parametrize("keep", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_filters_match_transformers_warpers_with_min_tokens_to_keep(keep, scale):
    tr = pytest.importorskip("transformers")
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(int(scale) + keep)) * scale
    ids = torch.zeros(16, 1, dtype=torch.long)
    cases = [(lambda x: top_k_filter(x, 2, keep), tr.TopKLogitsWarper(top_k=2, min_tokens_to_keep=keep))]
    for p in (0.05, 0.5, 0.95):
        cases.append((lambda x, p=p: top_p_filter(x, p, keep), tr.TopPLogitsWarper(top_p=p, min_tokens_to_keep=keep)))
        cases.append((lambda x, p=p: min_p_filter(x, p, keep), tr.MinPLogitsWarper(min_p=p, min_tokens_to_keep=keep)))
        cases.append((lambda x, p=p: typical_filter(x, p, keep),
                      tr.TypicalLogitsWarper(mass=p, min_tokens_to_keep=keep)))
    for ours, theirs in cases:
        mine, reference = ours(logits.clone()), theirs(ids, logits.clone())
        assert torch.equal(mine == -INF, reference == -INF), theirs
        assert torch.equal(mine[mine > -INF], logits[mine > -INF])
        assert ((mine > -INF).sum(-1) >= keep).all()


def test_history_processors_match_transformers():
    """Logit bias, repetition penalty, no-repeat n-grams, banned tokens and min_new_tokens, each against
    its transformers processor, on random histories over a small vocabulary (so n-grams do repeat)."""
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    V, B, T_prompt, n_new = 12, 6, 5, 20
    sequences = torch.randint(V, (B, T_prompt + n_new), generator=g)
    logits = torch.randn(B, V, generator=g) * 2
    stop = 3
    for n in (1, 2, 3):
        expected = tr.NoRepeatNGramLogitsProcessor(n)(sequences, logits.clone())
        banned = sample.no_repeat_ngram_mask(sequences.tolist(), n, V)
        assert torch.equal(banned, expected == -INF) and banned.any()
    params = SamplingParams(repetition_penalty=1.7, no_repeat_ngram_size=2, logit_bias={1: 2.5, 7: -1.25},
                            banned_tokens=(4, 9), min_new_tokens=n_new + 1)
    reference = tr.LogitsProcessorList([
        tr.SequenceBiasLogitsProcessor(sequence_bias=[[[1], 2.5], [[7], -1.25]]),
        tr.RepetitionPenaltyLogitsProcessor(1.7), tr.NoRepeatNGramLogitsProcessor(2),
        tr.SuppressTokensLogitsProcessor([4, 9]),
        tr.MinNewTokensLengthLogitsProcessor(T_prompt, n_new + 1, eos_token_id=stop)])
    state = sample.DecodeState(params, sequences[:, :T_prompt].tolist(), V, stop_tokens=[stop])
    for token in sequences[:, T_prompt:].T:
        state.update(token)
    assert torch.equal(state.process(logits.clone()), reference(sequences, logits.clone()))
    min_new = sample.DecodeState(SamplingParams(min_new_tokens=2), [[1]] * B, V, stop_tokens=[stop])
    for _ in range(2):
        assert (min_new.process(logits)[:, stop] == -INF).all()
        min_new.update(torch.zeros(B, dtype=torch.long))
    assert torch.equal(min_new.process(logits), logits)                 # two tokens out: the stop token is back


def test_generate_with_every_option_equals_transformers_greedy_generate():
    pytest.importorskip("transformers")
    from tests.reference import hf_llama_like
    model = make_model(std=0.15, vocab_size=24)
    prompts = [[5, 9, 2, 13], [7, 1, 7]]
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4)
    free = generate(model, prompts, 12, temperature=0, logit_bias={6: 1.5}, banned_tokens=[11], **options)
    stop = free[0][6].item()                # a token it generates after min_new_tokens: the stop token ends it
    ours = generate(model, prompts, 12, temperature=0, logit_bias={6: 1.5}, banned_tokens=[11], stop_tokens=[stop],
                    **options)
    hf = hf_llama_like(model, "eager").eval()
    for prompt, tokens in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=12, eos_token_id=stop, pad_token_id=stop,
                          sequence_bias=[[[6], 1.5]], suppress_tokens=[11], **options)[0, len(prompt):].tolist()
        assert tokens.tolist() == (out[:out.index(stop)] if stop in out else out)
    assert any(len(t) < 12 for t in ours)                            # the stop token did end a row


def test_speculative_and_beam_refuse_what_they_cannot_do(refused):
    target = make_model()
    with pytest.raises(ValueError, match=r"banned_tokens: token 64 is not in the model's vocabulary \(ids 0..63\)"):
        generate(target, [1, 2], 4, banned_tokens=[3, 64])
    with pytest.raises(ValueError, match="logit_bias: token -1"):
        speculative_generate(target, target, [1, 2], 4, logit_bias={-1: 2.0})
    with pytest.raises(ValueError, match="speculative decoding takes one prompt, got a batch of 2"):
        speculative_generate(target, target, [[1, 2], [3, 4, 5]], 4)
    with pytest.raises(ValueError, match="batch of 2"):
        speculative_generate(target, target, torch.tensor([[1, 2], [3, 4]]), 4)
    for argv in (["--strategy", "speculative", "--draft-ckpt", "d", "--no-repeat-ngram-size", "2"],
                 ["--strategy", "beam", "--logit-bias", "3=1"]):
        code, err = refused(sample.main, "--ckpt", "somewhere", *argv)
        assert code == 2 and "takes no" in err


# ----------------------------------------------------------------------------------------------------------
# Beam search

def test_beam_width_one_equals_greedy():
    model = make_model()
    prompt = [5, 9, 2, 33]
    greedy = greedy_reference(model, prompt, 16)
    (tokens, _), = beam_search(model, prompt, 16, beam_width=1)
    assert tokens.tolist() == greedy
    stop = greedy[6]
    (tokens, _), = beam_search(model, prompt, 16, beam_width=1, stop_tokens=[stop])
    assert tokens.tolist() == generate(model, prompt, 16, temperature=0, stop_tokens=[stop])[0].tolist()


def test_wide_beam_finds_the_most_probable_sequence_by_brute_force():
    """Width V^(n-1) keeps every prefix, so the best beam is the argmax over all V^n continuations."""
    V, n = 5, 3
    model = make_model(vocab_size=V, std=0.5)
    prompt = [1, 3]
    candidates = list(itertools.product(range(V), repeat=n))
    scores = dict(zip(candidates, sequence_logprobs(model, prompt, candidates)))
    best = max(scores, key=scores.get)
    beams = beam_search(model, prompt, n, beam_width=V ** (n - 1), length_penalty=0.0)
    assert tuple(beams[0][0].tolist()) == best
    assert beams[0][1] == pytest.approx(scores[best], abs=1e-4)
    ranked = sorted(scores.values(), reverse=True)
    assert [s for _, s in beams[:5]] == pytest.approx(ranked[:5], abs=1e-4)   # the top 5, in order


def test_beam_scores_are_recomputable_and_beat_greedy():
    model = make_model(std=0.2)
    prompt = [5, 9, 2, 33]
    greedy = greedy_reference(model, prompt, 12)
    beams = beam_search(model, prompt, 12, beam_width=4, length_penalty=0.0)
    assert len(beams) == 4 and [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
    for tokens, score in beams:
        assert score == pytest.approx(sequence_logprob(model, prompt, tokens.tolist()), abs=1e-4)
    assert beams[0][1] >= sequence_logprob(model, prompt, greedy) - 1e-6


def test_beam_length_penalty_scores_finished_hypotheses():
    """A hypothesis ending in a stop token scores (log P including the stop token) / length^alpha."""
    model = make_model(std=0.2)
    prompt = [5, 9]
    stop = greedy_reference(model, prompt, 6)[2]
    for alpha in (0.0, 1.0, 2.0):
        beams = beam_search(model, prompt, 6, beam_width=3, length_penalty=alpha, stop_tokens=[stop],
                            early_stopping=False)
        for tokens, score in beams:
            tokens = tokens.tolist()
            assert stop not in tokens
            ended = len(tokens) < 6
            full = tokens + [stop] if ended else tokens
            assert score == pytest.approx(sequence_logprob(model, prompt, full) / len(full) ** alpha, abs=1e-4)


def hf_beam_search(model, prompts, n, W, stop, length_penalty, early_stopping):
    """transformers' generate(num_beams=W) on the same weights: per prompt, W (tokens, score), the stop
    token and the padding after it cut off."""
    from tests.reference import hf_llama_like
    hf = hf_llama_like(model, "eager").eval()
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[stop] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, num_beams=W, num_return_sequences=W, max_new_tokens=n,
                      early_stopping=early_stopping, length_penalty=length_penalty, eos_token_id=stop,
                      pad_token_id=stop, do_sample=False, output_scores=True, return_dict_in_generate=True)
    results = []
    for b in range(len(prompts)):
        hyps = []
        for j in range(W):
            tokens = out.sequences[b * W + j, T:].tolist()
            hyps.append((tokens[:tokens.index(stop)] if stop in tokens else tokens,
                         out.sequences_scores[b * W + j].item()))
        results.append(hyps)
    return results


@pytest.mark.parametrize("seed,W,length_penalty,early_stopping", [(0, 3, 1.0, True), (1, 4, 1.0, True),
                                                                  (2, 2, 0.0, True), (3, 4, 2.0, True),
                                                                  (4, 3, 1.0, False), (5, 4, 0.5, False)])
def test_beam_search_matches_transformers_on_every_beam_and_score(seed, W, length_penalty, early_stopping):
    """Against generate(num_beams=W, early_stopping=...): finished hypotheses only once W are done (never
    a live, unfinished beam beside them), stop tokens finalized only from the top W, over a batch of
    prompts of different lengths."""
    pytest.importorskip("transformers")
    model = make_model(seed=seed, std=0.15, vocab_size=24)
    prompts = [[5, 9, 2, 13], [7, 1], [3, 3, 8]]
    n = 10
    stop = greedy_reference(model, prompts[0], n)[1 + seed % 3]
    expected = hf_beam_search(model, prompts, n, W, stop, length_penalty, early_stopping)
    beams = beam_search(model, prompts, n, beam_width=W, length_penalty=length_penalty,
                        early_stopping=early_stopping, stop_tokens=[stop])
    for got, want in zip(beams, expected):
        assert [t.tolist() for t, _ in got] == [t for t, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
    alone = beam_search(model, prompts[1], n, beam_width=W, length_penalty=length_penalty,
                        early_stopping=early_stopping, stop_tokens=[stop])
    assert [t.tolist() for t, _ in alone] == [t.tolist() for t, _ in beams[1]]


# ----------------------------------------------------------------------------------------------------------
# Speculative decoding

def test_speculative_greedy_returns_exactly_the_targets_greedy_output():
    target, draft = make_model(seed=0, n_layers=3), make_model(seed=1, n_layers=1)
    prompt = [5, 9, 2, 33]
    for n_draft in (1, 3, 7):
        tokens, stats = speculative_generate(target, draft, prompt, 25, n_draft, temperature=0)
        assert tokens.tolist() == greedy_reference(target, prompt, 25)
        assert stats["target_calls"] < 25 or stats["accepted"] == 0
    tokens, stats = speculative_generate(target, target, prompt, 25, 4, temperature=0)
    assert tokens.tolist() == greedy_reference(target, prompt, 25) and stats["acceptance_rate"] == 1.0


def test_speculative_sampling_follows_the_target_distribution():
    """Joint frequencies of the first two tokens over 2,000 runs match the target's exact distribution
    (chi-square at the 0.1% level), and are far from the draft's (the test can tell them apart)."""
    V = 4  # one layer each: 2,000 runs, the time in each model's forward (the distributions are what is tested)
    target, draft = (make_model(seed=0, vocab_size=V, std=0.6, n_layers=1),
                     make_model(seed=5, vocab_size=V, std=0.6, n_layers=1))
    prompt = [1, 2, 3]

    def joint(model):
        with torch.no_grad():
            first = model(torch.tensor([prompt]))[0][0, -1].softmax(-1)
            return {(a, b): first[a].item() * model(torch.tensor([prompt + [a]]))[0][0, -1].softmax(-1)[b].item()
                    for a in range(V) for b in range(V)}
    n, counts, accepted, drafted = 2000, {}, 0, 0
    for i in range(n):
        tokens, stats = speculative_generate(target, draft, prompt, 3, 2, temperature=1.0, seed=i)
        key = tuple(tokens[:2].tolist())
        counts[key] = counts.get(key, 0) + 1
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
    stat, df = chi_square(counts, joint(target), n)
    assert stat < chi_square_critical_001(df)
    stat_draft, df_draft = chi_square(counts, joint(draft), n)
    assert stat_draft > 10 * chi_square_critical_001(df_draft)
    assert 0 < accepted < drafted    # both branches of the acceptance rule ran


def test_speculative_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(make_model(vocab_size=64), make_model(vocab_size=32), [1, 2], 4)


# ----------------------------------------------------------------------------------------------------------
# Streaming text

class ByteTokenizer:
    """Token i is the single byte i: every multi-byte UTF-8 character is split across tokens."""
    special_tokens = {}

    def decode_bytes(self, ids):
        return bytes(ids)


def test_stream_prints_multibyte_characters_whole_and_never_a_replacement_character():
    text = "héllo, 世界! 🙂 床前明月光"
    stream, pieces = TextStream(ByteTokenizer()), []
    for i, byte in enumerate(text.encode("utf-8")):
        pieces.append(stream.push(byte))
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # each character is released by the token carrying its last byte, not before
    assert [p for p in pieces if p] == list(text)
    assert pieces[:5] == ["h", "", "é", "l", "l"]


def test_stream_stop_strings_cut_the_text_across_token_boundaries():
    stream = TextStream(ByteTokenizer(), stop_strings=["世界", "END"])
    out = ""
    for byte in "ab 世X 世界 never".encode("utf-8"):
        out += stream.push(byte)
        if stream.stopped:
            break
    assert out == "ab 世X " and stream.stopped and stream.finish() == ""
    stream = TextStream(ByteTokenizer(), stop_strings=["EN"])  # a held-back partial match is released at the end
    assert stream.push(ord("E")) == "" and stream.finish() == "E"
    stream = TextStream(ByteTokenizer())
    assert stream.push(0xE4) == "" and stream.finish() == "\ufffd"  # a truly incomplete character


def test_stream_shows_ids_the_tokenizer_lacks_as_replacement_characters():
    class PaddedVocabulary(ByteTokenizer):  # the model's vocabulary is larger than the tokenizer's
        def decode_bytes(self, ids):
            if any(i >= 256 for i in ids):
                raise ValueError(f"id {max(ids)} is not in the vocabulary")
            return bytes(ids)
    stream = TextStream(PaddedVocabulary())
    assert [stream.push(i) for i in (ord("a"), 300, ord("b"))] == ["a", "\ufffd", "b"]


class LetterTokenizer:
    """Token i is the letter 'a' + i % 26."""
    special_tokens = {}

    def decode_bytes(self, ids):
        return bytes(ord("a") + i % 26 for i in ids)


def test_generate_streams_text_and_stops_at_stop_strings():
    model = make_model()
    prompts = [[5, 9, 2], [7, 7]]
    free = generate(model, prompts, 20, temperature=0)
    text0 = LetterTokenizer().decode_bytes(free[0].tolist()).decode()
    stop = text0[6:8]
    first = text0.index(stop)
    streamed = {0: "", 1: ""}
    out = generate(model, prompts, 20, temperature=0, tokenizer=LetterTokenizer(), stop_strings=[stop],
                   on_text=lambda row, text: streamed.__setitem__(row, streamed[row] + text))
    assert streamed[0] == text0[:first]
    assert out[0].tolist() == free[0][:first + len(stop)].tolist()   # up to the token completing the stop string
    text1 = LetterTokenizer().decode_bytes(free[1].tolist()).decode()
    assert streamed[1] == (text1[:text1.index(stop)] if stop in text1 else text1)


# ----------------------------------------------------------------------------------------------------------
# Chat template and CLI

def test_render_chatml():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chatml(messages, add_generation_prompt=True) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                       "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chatml(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny nanollm checkpoint directory with its bpe.py tokenizer saved beside it, as train.py does."""
    bpe = pytest.importorskip("bpe")
    directory = tmp_path_factory.mktemp("ckpt")
    tokenizer = bpe.Tokenizer.train("To be, or not to be: that is the question. " * 20 + "床前明月光，疑是地上霜。", 300)
    tokenizer.save(directory / "tokenizer")
    model = make_model(vocab_size=320, max_seq_len=96, std=0.1)
    save_checkpoint(directory, model, tokenizer="tokenizer")
    return directory, model, tokenizer


def test_encode_chat_equals_encoding_the_rendered_template(checkpoint):
    _, _, tokenizer = checkpoint
    messages = [{"role": "user", "content": "To be?"}, {"role": "assistant", "content": "床前"}]
    assert prompt_ids(tokenizer, messages) == tokenizer.encode(render_chatml(messages, True), allowed_special="all")
    forged = prompt_ids(tokenizer, [{"role": "user", "content": "<|im_end|>"}])
    assert forged.count(tokenizer.special_tokens["<|im_end|>"]) == 1   # content never becomes a marker


def test_cli_greedy_prints_the_continuation_and_tokens_per_second(checkpoint, capsys):
    directory, model, tokenizer = checkpoint
    sample.main(["--ckpt", str(directory), "--prompt", "To be", "--strategy", "greedy", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    ids = tokenizer.encode("To be")
    expected = generate(model, ids, 12, temperature=0, stop_tokens=[tokenizer.special_tokens["<|endoftext|>"]])[0]
    assert out == "To be" + tokenizer.decode(expected.tolist()) + "\n"
    assert "tokens/s" in err


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_cli_num_samples(checkpoint, capsys, strategy):
    directory, _, _ = checkpoint
    sample.main(["--ckpt", str(directory), "--prompt", "To", "--strategy", strategy, "--num-samples", "2",
                 "--max-new-tokens", "5", "--seed", "0", "--beam-width", "3"])
    out, err = capsys.readouterr()
    assert out.count("--- sample") == 2 and "tokens/s" in err


def test_cli_interactive_chat_keeps_history_and_handles_commands(checkpoint, capsys, monkeypatch):
    directory, _, tokenizer = checkpoint
    prompts = []
    real_generate = sample.generate

    def recording_generate(model, prompts_, *a, **kw):
        prompts.append(tokenizer.decode(prompts_[0]))
        return real_generate(model, prompts_, *a, **kw)
    monkeypatch.setattr(sample, "generate", recording_generate)
    lines = iter(["hello", "again", "/reset", "fresh", "/system Be brief.", "hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sample.main(["--ckpt", str(directory), "--interactive", "--max-new-tokens", "4", "--strategy", "greedy"])
    out, err = capsys.readouterr()
    assert len(prompts) == 4 and out.count("assistant> ") == 4
    assert prompts[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("user\nagain<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[2] == "<|im_start|>user\nfresh<|im_end|>\n<|im_start|>assistant\n"       # /reset
    assert prompts[3] == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                          "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")    # /system resets too
    assert "history cleared" in err


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--strategy", "nucleus"], "invalid choice: 'nucleus'"),
    (["--strategy", "speculative"], "needs --draft-ckpt"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_cli_rejects_bad_arguments(argv, message, refused):
    code, err = refused(sample.main, "--ckpt", "somewhere", *argv)
    assert code == 2 and message in err


def test_cli_reports_a_directory_without_a_model(tmp_path, refused):
    code, err = refused(sample.main, "--ckpt", tmp_path, "--prompt", "x")
    assert code == 1 and "no nanollm checkpoint" in err and "Traceback" not in err


def test_cli_prompt_longer_than_the_context(checkpoint, capsys, refused):
    directory, _, _ = checkpoint
    long_prompt = "To be, or not to be: that is the question. " * 60
    code, err = refused(sample.main, "--ckpt", directory, "--prompt", long_prompt, "--max-new-tokens", "4")
    assert code == 1 and "--truncate left" in err
    sample.main(["--ckpt", str(directory), "--prompt", long_prompt, "--max-new-tokens", "4", "--truncate", "left",
                 "--strategy", "greedy"])
    assert "tokens/s" in capsys.readouterr().err


def test_cli_loads_a_hugging_face_directory_with_its_tokenizer(tmp_path, data_dir, capsys):
    """A Hugging Face model directory (save_hf) whose tokenizer.json is GPT-2's."""
    import shutil
    from hf_io import save_hf
    from common import load_tokenizer
    model = make_model(vocab_size=50257, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, std=0.1)
    save_hf(model, tmp_path)
    shutil.copy(data_dir / "tokenizers" / "gpt2_tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.special_tokens["<|endoftext|>"] == 50256
    sample.main(["--ckpt", str(tmp_path), "--prompt", "Hello world", "--strategy", "greedy", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    expected = generate(model, tokenizer.encode("Hello world"), 6, temperature=0, stop_tokens=[50256])[0]
    assert out == "Hello world" + tokenizer.decode(expected.tolist()) + "\n"
