"""Two decoders beyond sampling one token at a time: beam search and speculative decoding. Both drive the
model through sample.py's small functions (prefill: prompt -> KV cache and next logits; decode_step: one
token per row -> next logits) and keep their KV caches their own way: beam search reorders the cache's rows
to follow its beams, speculative decoding rewinds two caches to the last accepted token.

    python sample.py --ckpt out/shakespeare --prompt "ROMEO:" --strategy beam --beam-width 4 --num-samples 2
    python sample.py --ckpt out/big --draft-ckpt out/tiny --strategy speculative --prompt "ROMEO:"

- beam search: keep the `beam_width` most probable prefixes; finished hypotheses are ranked by
  log P / length^alpha (the length penalty of Wu et al. 2016).
- speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k
  tokens x_i ~ q_i, the target scores all of them in one forward pass, x_i is accepted with
  probability min(1, p_i(x_i) / q_i(x_i)), the first rejected one is replaced by a sample of
  norm(max(0, p_i - q_i)), and when all k pass one more token comes from p_{k+1}. The output is
  distributed exactly as the target model's own samples, in fewer target passes.
"""
import torch
import torch.nn.functional as F

from model import Transformer
from sample import SamplingParams, TextStream, check_prompt_length, decode_step, left_pad, prefill, sample_from


# ----------------------------------------------------------------------------------------------------------
# Beam search

def reorder_cache(cache, rows: torch.Tensor) -> None:
    """Make the cache hold rows `rows` (new_B,) of itself, in that order: rows may repeat or vanish."""
    cache.keys = cache.keys.index_select(1, rows)       # (n_layers, new_B, n_kv_heads, S, head_dim)
    cache.values = cache.values.index_select(1, rows)
    if cache.pad_lens is not None:
        cache.pad_lens = cache.pad_lens.index_select(0, rows)


@torch.inference_mode()
def beam_search(model: Transformer, prompts, max_new_tokens: int, beam_width: int = 4, length_penalty: float = 1.0,
                early_stopping: bool = True, stop_tokens=()):
    """The beam_width best continuations of each prompt, best first, as (new tokens, score).

    prompts: one prompt (a list of ints or a 1-D tensor), which returns its list of (tokens, score), or
    several (see left_pad), which return one such list per prompt. Each prompt's W = beam_width beams are
    rows of one batch (the KV cache rows follow their beams). Every step, as transformers'
    generate(num_beams=W) and fairseq do:
      - the 2W best continuations (beam + token) by sum of log probabilities are taken, best first;
      - a continuation ending in a stop token becomes a finished hypothesis only if it ranks among the
        first W (the other W exist only so that W live beams remain); it is scored
        sum log p / length^length_penalty, the stop token counted in both and not returned;
      - the W best continuations without a stop token are the next step's beams;
      - at the last step (max_new_tokens, or the context full) the W best continuations are finished.
    Only the W best finished hypotheses are kept. A prompt is done, and its hypotheses final, with
    early_stopping as soon as W are finished; without it, once the best live beam, scored at its
    current length, cannot beat the worst of them (transformers' heuristic for early_stopping=False).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    single = (torch.is_tensor(prompts) and prompts.dim() == 1) or (len(prompts) and isinstance(prompts[0], int))
    device = model.embed_tokens.weight.device
    ids, pad_lens = left_pad(prompts, device)
    B, T = ids.shape
    check_prompt_length(T, model.config.max_seq_len)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - T)
    stop = set(stop_tokens)
    W = beam_width
    finished = [[] for _ in range(B)]          # per prompt: (score, tokens) of up to W hypotheses, best first
    done = [max_new_tokens == 0] * B

    def score(sum_logprob: float, length: int) -> float:
        return sum_logprob / length ** length_penalty

    cache = model.new_kv_cache(B, T + max_new_tokens, pad_lens)
    logits = prefill(model, ids, cache)                                   # (B, V)
    rows = torch.arange(B, device=device).repeat_interleave(W)            # W copies of each prompt
    reorder_cache(cache, rows)
    logits = logits[rows]                                                 # (B * W, V)
    # a prompt's W beams start as the same prefix: only the first may expand, or a step would pick duplicates
    beam_scores = torch.full((B, W), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_tokens = [[] for _ in range(B * W)]                             # row b * W + j: beam j of prompt b
    for i in range(max_new_tokens):
        if all(done):
            break
        last = i == max_new_tokens - 1
        logprobs = F.log_softmax(logits.float(), dim=-1)                  # (B * W, V)
        V = logprobs.size(-1)
        candidates = (beam_scores[..., None] + logprobs.view(B, W, V)).view(B, W * V)
        top_scores, top_index = candidates.topk(min(2 * W, W * V), dim=-1)   # (B, 2W), best first
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            live = []
            for rank, (s, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                if s == float("-inf"):
                    break
                beam, token = divmod(index, V)
                if token in stop or last:
                    if rank < W and not done[b]:
                        tokens = beam_tokens[b * W + beam] + ([] if token in stop else [token])
                        finished[b].append((score(s, i + 1), tokens))
                elif len(live) < W:
                    live.append((b * W + beam, token, s))
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:W]
            if len(finished[b]) == W and (early_stopping or not live or score(live[0][2], i + 1) <= finished[b][-1][0]):
                done[b] = True
            live += [(live[0][0] if live else b * W, 0, float("-inf"))] * (W - len(live))   # dead rows pad the batch
            for row, token, s in live:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(s)
        if last or all(done):
            break
        rows = torch.tensor(next_rows, device=device)
        new_tokens = torch.tensor(next_tokens, device=device)
        beam_scores = torch.tensor(next_scores, device=device).view(B, W)
        beam_tokens = [beam_tokens[row] + [token] for row, token in zip(next_rows, next_tokens)]
        reorder_cache(cache, rows)
        logits = decode_step(model, new_tokens, T + i, cache)
    results = [[(torch.tensor(tokens, dtype=torch.long), s) for s, tokens in hyps] for hyps in finished]
    return results[0] if single else results


# ----------------------------------------------------------------------------------------------------------
# Speculative decoding

@torch.inference_mode()
def speculative_generate(target: Transformer, draft: Transformer, prompt, max_new_tokens: int, n_draft: int = 4, *,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, typical_p: float | None = None, min_tokens_to_keep: int = 1,
                         logit_bias: dict | None = None, banned_tokens=(), seed: int | None = None, stop_tokens=(),
                         stop_strings=(), tokenizer=None, on_text=None) -> tuple[torch.Tensor, dict]:
    """Sample from `target` with `draft` proposing n_draft tokens per round; returns (new tokens, stats).

    Each round keeps the invariant: the target's cache holds every token but the last, the draft's
    cache a prefix of them. The draft catches up and proposes x_1..x_k with distributions q_1..q_k;
    the target runs once on [last token, x_1..x_k], giving p_1..p_{k+1}; x_i is accepted with
    probability min(1, p_i(x_i) / q_i(x_i)); the first rejected x_i is replaced by a sample of
    norm(max(0, p_i - q_i)); if all pass, x_{k+1} ~ p_{k+1}. Positions past the accepted tokens are
    simply overwritten next round. p and q are the distributions after temperature / top-k / top-p /
    min-p / typical-p (and logit bias, banned tokens), so the output follows exactly what `generate`
    with the same settings samples from the target; with temperature 0 both are one-hot and this returns
    the target's greedy output. Options that depend on the tokens so far (penalties, no-repeat n-grams,
    min_new_tokens) would change p and q per drafted token and are not taken.
    stats: drafted, accepted, acceptance_rate (accepted / drafted), target_calls. One prompt: a batch
    is refused (rows accept different numbers of tokens, so they would fall out of step).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, typical_p=typical_p,
                            min_tokens_to_keep=min_tokens_to_keep, logit_bias=logit_bias,
                            banned_tokens=tuple(banned_tokens))
    n_rows = prompt.size(0) if torch.is_tensor(prompt) and prompt.dim() == 2 else \
        len(prompt) if not torch.is_tensor(prompt) and len(prompt) and hasattr(prompt[0], "__len__") else 1
    if n_rows > 1:
        raise ValueError(f"speculative decoding takes one prompt, got a batch of {n_rows}: call it once per "
                         f"prompt (or use generate, which batches)")
    params.check_vocab(target.config.vocab_size)
    if n_draft < 1:
        raise ValueError(f"n_draft must be >= 1, got {n_draft}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): they must share a tokenizer")
    if (stop_strings or on_text) and tokenizer is None:
        raise ValueError("stop_strings and on_text need a tokenizer to turn tokens into text")
    device = target.embed_tokens.weight.device
    tokens = [int(t) for t in torch.as_tensor(prompt).flatten()]
    L0 = len(tokens)
    if L0 == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on")
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    check_prompt_length(L0, context)
    end = L0 + min(max_new_tokens, context - L0)                                # final sequence length
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stream = TextStream(tokenizer, stop_strings) if tokenizer is not None else None
    stop = set(stop_tokens)

    def ids(values):  # a list of token ids -> (1, T)
        return torch.tensor([values], dtype=torch.long, device=device)

    def pick(probs):  # (V,) -> one token id
        return int(probs.argmax()) if params.greedy else int(sample_from(probs, generator))

    target_cache, draft_cache = target.new_kv_cache(1, end), draft.new_kv_cache(1, end)
    if L0 > 1:
        prefill(target, ids(tokens[:-1]), target_cache)
    draft_len = 0                         # tokens whose keys/values are in the draft's cache
    stats = {"drafted": 0, "accepted": 0, "target_calls": 0}
    stopped = False
    while len(tokens) < end and not stopped:
        L = len(tokens)
        k = min(n_draft, end - L - 1)     # this round adds up to k + 1 tokens
        drafted, q = [], []
        if k > 0:
            logits = prefill(draft, ids(tokens[draft_len:]), draft_cache, start_pos=draft_len)
            for j in range(k):
                q.append(params.probs(logits)[0])                                # (V,)
                drafted.append(pick(q[-1]))
                if j < k - 1:
                    logits = decode_step(draft, ids(drafted[-1:])[0], L + j, draft_cache)
            draft_len = L + k - 1
        # the one forward that needs every position's logits: p_1..p_{k+1} for the k drafted tokens
        p = params.probs(target(ids(tokens[-1:] + drafted), start_pos=L - 1, kv_cache=target_cache)[0][0])  # (k+1, V)
        n_accepted = 0
        for j, x in enumerate(drafted):
            if torch.rand((), generator=generator, device=device).item() < (p[j, x] / q[j][x]).item():
                n_accepted += 1
                continue
            residual = (p[j] - q[j]).clamp(min=0)
            correction = pick(residual / residual.sum() if residual.sum() > 0 else p[j])
            break
        else:
            correction = pick(p[k])
        stats["target_calls"] += 1
        stats["drafted"] += k
        stats["accepted"] += n_accepted
        draft_len = min(draft_len, L + n_accepted)  # the draft's keys past the accepted tokens are stale
        for x in drafted[:n_accepted] + [correction]:
            if x in stop:
                stopped = True
                break
            tokens.append(x)
            if stream is not None:
                text = stream.push(x)
                if text and on_text:
                    on_text(0, text)
                if stream.stopped:
                    stopped = True
                    break
    if stream is not None:
        text = stream.finish()
        if text and on_text:
            on_text(0, text)
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else float("nan")
    return torch.tensor(tokens[L0:], dtype=torch.long), stats
