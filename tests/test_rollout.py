"""rollout.generate on tiny random models: the cached, batched sampler against a naive one that re-runs
the whole sequence every step, log-probs against one forward pass, batching and slot scheduling that
do not change the result, the hard cutoff and EOS, the sampling rules (greedy, top-k, top-p, seeds), the
decode step that CUDA graphs replay, and the flash-attn decode path against a reference of its kernel."""

import pytest
import torch

import model as model_py
import rollout
from model import Linear, ModelArgs, Transformer
from rollout import attend_length, generate, sample

EOS = 21  # a token these tiny models emit now and then, so some rows stop early and some are cut off
PROMPTS = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [18, 19, 20]]


def tiny(seed=0, std=0.1, vocab=61, eos=EOS):
    args = ModelArgs(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos)
    return Transformer(args).init_weights(std=std, seed=seed).eval()


@torch.no_grad()
def naive(model, prompts, n, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(EOS,), seed=0):
    """The oracle: each row alone, the full sequence re-run every step, the documented uniforms table.
    max_new_tokens: an int, or one limit per prompt."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    u = torch.rand(len(prompts) * n + 1, max(limits), generator=torch.Generator().manual_seed(seed))
    rows = []
    for i in range(len(prompts) * n):
        seq, toks, lps = list(prompts[i // n]), [], []
        for t in range(limits[i // n]):
            logits = model(torch.tensor([seq]))[:, -1].float()  # (1, V)
            tok, lp = sample(logits, u[i, t:t + 1], temperature, top_k, top_p)
            seq.append(int(tok))
            toks.append(int(tok))
            lps.append(float(lp))
            if int(tok) in eos_ids:
                break
        rows.append((toks, lps))
    return rows


def completions(ro):
    return [ro.tokens[i, :ro.lengths[i]].tolist() for i in range(len(ro.lengths))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_cached_batched_sampling_equals_naive_resampling(temperature, top_k, top_p):
    """Same seed, same tokens and log-probs as re-running the full sequence each step, for greedy and
    sampled decoding, with rows of different prompt lengths stopping at different times (EOS)."""
    model = tiny(std=0.3)
    ro = generate(model, PROMPTS, n=3, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=7, max_batch=5)
    ref = naive(model, PROMPTS, 3, 12, temperature, top_k, top_p, seed=7)
    assert completions(ro) == [toks for toks, _ in ref]
    assert ro.finished.tolist() == [toks[-1] == EOS for toks, _ in ref]
    for i, (_, lps) in enumerate(ref):
        torch.testing.assert_close(ro.logprobs[i, :len(lps)], torch.tensor(lps), atol=1e-4, rtol=1e-4)
    assert 0 < int(ro.finished.sum()) < len(ref), "the test needs rows that stop early and rows cut off"


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 5), (0.0, 0)])
def test_logprobs_equal_one_forward_pass(temperature, top_k):
    """The trainer's "old" log-probs: one forward over prompt+completion, under the same temperature
    (and top-k renormalisation); plain softmax for greedy. Zero at padding."""
    model = tiny(std=0.2)
    ro = generate(model, PROMPTS, n=2, max_new_tokens=16, temperature=temperature, top_k=top_k, seed=1)
    for i, comp in enumerate(completions(ro)):
        prompt = PROMPTS[ro.prompt_index[i]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + comp]))[0, len(prompt) - 1:-1].float()  # (len, V)
        logits = logits / (temperature or 1.0)
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None])[:, 0]
        torch.testing.assert_close(ro.logprobs[i, :len(comp)], ref, atol=1e-4, rtol=1e-4)
        assert (ro.logprobs[i, len(comp):] == 0).all() and (ro.tokens[i, len(comp):] == 0).all()


def test_batched_equals_one_at_a_time(monkeypatch):
    """Prompts of different lengths: one slot (each sequence alone) and many slots give the same samples,
    as does a prefill of one prompt per forward; greedy completions also equal those of each prompt
    generated on its own."""
    model = tiny(std=0.3)
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, seed=5)
    one = generate(model, PROMPTS, max_batch=1, **kw)
    for max_batch in (2, 7, 64):
        many = generate(model, PROMPTS, max_batch=max_batch, **kw)
        assert completions(many) == completions(one)
        torch.testing.assert_close(many.logprobs, one.logprobs, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(rollout, "PREFILL_TOKENS", 1)
    chunked = generate(model, PROMPTS, max_batch=64, **kw)
    assert completions(chunked) == completions(one)
    torch.testing.assert_close(chunked.logprobs, one.logprobs, atol=1e-5, rtol=1e-5)
    batched = generate(model, PROMPTS, n=2, max_new_tokens=10, temperature=0)
    alone = [generate(model, [p], n=2, max_new_tokens=10, temperature=0) for p in PROMPTS]
    assert completions(batched) == [c for ro in alone for c in completions(ro)]


def test_rows_are_prompt_major_and_usable_by_autograd():
    model = tiny().train()
    ro = generate(model, PROMPTS, n=3, max_new_tokens=4)
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ro.tokens.dtype == torch.long and ro.logprobs.dtype == torch.float32 and ro.finished.dtype == torch.bool
    assert model.training, "generate restores the model's mode"
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear)), "packed copies are dropped"
    # not inference tensors: the trainer runs a grad-enabled forward over them
    (model(ro.tokens).log_softmax(-1).mean() + ro.logprobs.sum() * 0).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_samples_of_a_prompt_differ_from_the_first_token():
    """The prompt is prefilled once, but each of its n samples draws its own first token."""
    model = tiny(std=0.02, vocab=512)  # near-uniform next-token distribution
    ro = generate(model, PROMPTS, n=8, max_new_tokens=1, eos_ids=(), seed=0)
    for p in range(len(PROMPTS)):
        firsts = ro.tokens[p * 8:(p + 1) * 8, 0].tolist()
        assert len(set(firsts)) >= 7, firsts


def test_hard_cutoff_and_eos():
    """No EOS within max_new_tokens: exactly max_new_tokens tokens, finished=False. EOS: kept, counted,
    finished=True, nothing after it (also when EOS is the very first token)."""
    model = tiny(std=0.3)
    free = generate(model, PROMPTS, n=1, max_new_tokens=9, temperature=0, eos_ids=())
    assert free.lengths.tolist() == [9] * 4 and not free.finished.any() and free.tokens.shape == (4, 9)
    toks = free.tokens.tolist()
    stop_first = toks[3][0]  # row 3 stops at its first token
    stop_mid = next(t for t in toks[0][3:] if t not in toks[0][:3] + [stop_first])  # row 0: at step >= 3
    ro = generate(model, PROMPTS, n=1, max_new_tokens=9, temperature=0, eos_ids=[stop_mid, stop_first])
    for i, row in enumerate(toks):
        hits = [t for t, tok in enumerate(row) if tok in (stop_mid, stop_first)]
        want = hits[0] + 1 if hits else 9
        assert ro.lengths[i] == want and bool(ro.finished[i]) == bool(hits)
        assert ro.tokens[i, :want].tolist() == row[:want] and (ro.tokens[i, want:] == 0).all()
    assert ro.lengths[3] == 1 and ro.finished[3]
    assert 4 <= ro.lengths[0] <= 9 and ro.finished[0]
    assert not ro.finished.all(), "the test needs a row that is cut off"


def test_eos_defaults_to_the_models_and_accepts_a_list():
    """eos_ids=None stops at the model's eos_token_id: with the same seed (so the same uniforms) each row is
    the never-stopping run's row cut right after its first EOS, finished exactly when it has one; an int or
    a list gives the same rows."""
    model = tiny(std=0.3)
    free = completions(generate(model, PROMPTS, n=4, max_new_tokens=12, seed=2, eos_ids=()))
    ro_default = generate(model, PROMPTS, n=4, max_new_tokens=12, seed=2)
    want = [row[:row.index(EOS) + 1] if EOS in row else row for row in free]
    assert completions(ro_default) == want
    assert ro_default.finished.tolist() == [EOS in row for row in free]
    assert 0 < int(ro_default.finished.sum()) < len(free), "the test needs rows that stop and rows cut off"
    for eos in (EOS, [EOS]):
        assert completions(generate(model, PROMPTS, n=4, max_new_tokens=12, seed=2, eos_ids=eos)) == want


def test_temperature_zero_is_greedy_and_ignores_the_seed():
    model = tiny(std=0.3)
    a = generate(model, PROMPTS, n=2, max_new_tokens=8, temperature=0, seed=0)
    b = generate(model, PROMPTS, n=2, max_new_tokens=8, temperature=0, seed=123)
    assert completions(a) == completions(b) == [toks for toks, _ in naive(model, PROMPTS, 2, 8, temperature=0)]


def test_seed_reproducibility():
    model = tiny(std=0.1)
    a = generate(model, PROMPTS, n=4, max_new_tokens=10, seed=11)
    b = generate(model, PROMPTS, n=4, max_new_tokens=10, seed=11, max_batch=3)
    c = generate(model, PROMPTS, n=4, max_new_tokens=10, seed=12)
    assert completions(a) == completions(b)
    assert completions(a) != completions(c)


def test_per_prompt_seeds_make_a_prompts_samples_independent_of_the_rest_of_the_call():
    """With one seed per prompt, a prompt's samples are the same alone, in any batch and in any order; sampled
    with its seed as the whole call's seed, it gives the same samples too (its rows are the table's first n)."""
    model = tiny(std=0.3)
    kw = dict(n=3, max_new_tokens=10, temperature=1.0)
    seeds = [101, 7, 55, 3]
    together = completions(generate(model, PROMPTS, seed=seeds, max_batch=5, **kw))
    alone = [c for p, s in zip(PROMPTS, seeds) for c in completions(generate(model, [p], seed=[s], **kw))]
    assert together == alone
    assert alone[:3] == completions(generate(model, PROMPTS[:1], seed=101, **kw))
    back = completions(generate(model, PROMPTS[::-1], seed=seeds[::-1], **kw))
    assert [back[3 * (3 - i) + j] for i in range(4) for j in range(3)] == together
    other = completions(generate(model, PROMPTS, seed=[101, 8, 55, 3], **kw))  # prompt 1's seed changed
    assert other[3:6] != together[3:6] and other[:3] + other[6:] == together[:3] + together[6:]
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        generate(model, PROMPTS, seed=[1, 2], **kw)


def test_sample_follows_the_filtered_distribution():
    """Inverse-CDF sampling on an even grid of uniforms hits each token in proportion to its probability
    under temperature -> top-k -> top-p; tokens outside the support are never drawn."""
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()[None].expand(10000, 5)
    u = (torch.arange(10000) + 0.5) / 10000

    def freq(**kw):
        tok, lp = sample(logits, u, **kw)
        return torch.bincount(tok, minlength=5).float() / 10000, tok, lp

    f, _, lp = freq()
    torch.testing.assert_close(f, probs, atol=2e-4, rtol=0)
    f, _, _ = freq(top_k=2)  # tokens 1 and 3, renormalised
    torch.testing.assert_close(f, torch.tensor([0, 4 / 7, 0, 3 / 7, 0]), atol=2e-4, rtol=0)
    f, tok, lp = freq(top_p=0.75)  # 0.4 + 0.3 < 0.75, so token 4 (0.15) joins; token 2 does not
    torch.testing.assert_close(f, torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=2e-4, rtol=0)
    torch.testing.assert_close(lp, (probs / 0.85).log()[tok])
    f, _, _ = freq(top_p=0.3)  # the top token alone already exceeds top_p
    assert f.tolist() == [0, 1, 0, 0, 0]
    f, _, _ = freq(temperature=0.5)  # p^2, renormalised
    torch.testing.assert_close(f, probs**2 / (probs**2).sum(), atol=2e-4, rtol=0)


def test_two_level_inverse_cdf_matches_a_float64_cumsum():
    """The blocked search picks the token a plain float64 cumsum picks, on a vocabulary that is not a
    multiple of the block, and never a zero-probability token, even for u just below 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=g) * 3
    logits[:, 990:] = float("-inf")  # a filtered tail in the last, partial block
    logits[1, :500] = float("-inf")  # and a row whose mass starts halfway
    u = torch.cat([(torch.arange(2000) + 0.5) / 2000, torch.tensor([0.0, 1 - 2**-24])])
    for r in range(3):
        row = logits[r:r + 1].expand(len(u), -1)
        tok, lp = sample(row, u)
        cdf = row[0].double().softmax(-1).cumsum(-1)
        ref = torch.searchsorted(cdf, u.double()[:, None] * cdf[-1], right=True)[:, 0].clamp(max=989)
        assert (tok == ref).float().mean() > 0.998  # float32 vs float64 may differ right at a boundary
        assert torch.isfinite(row[0, tok]).all()
        torch.testing.assert_close(lp, row[0].log_softmax(-1)[tok])


def test_top_k_and_top_p_restrict_the_support_in_generate():
    model = tiny(std=0.3)
    for kw in (dict(top_k=3), dict(top_p=0.5)):
        ro = generate(model, PROMPTS, n=4, max_new_tokens=8, eos_ids=(), seed=4, **kw)
        for i, comp in enumerate(completions(ro)):
            prompt = PROMPTS[ro.prompt_index[i]]
            with torch.no_grad():
                p = model(torch.tensor([prompt + comp]))[0, len(prompt) - 1:-1].softmax(-1)  # (len, V)
            rank = (p > p.gather(-1, torch.tensor(comp)[:, None])).sum(-1)  # tokens more likely than the one drawn
            if "top_k" in kw:
                assert (rank < 3).all()
            else:  # the mass strictly above the drawn token is below top_p
                above = (p * (p > p.gather(-1, torch.tensor(comp)[:, None]))).sum(-1)
                assert (above < 0.5).all()


@pytest.mark.slow  # inductor's C++ compile alone takes ~30 s on 2 cores, however tiny the model
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny(std=0.3)
    kw = dict(n=2, max_new_tokens=6, seed=3, max_batch=8)
    assert completions(generate(model, PROMPTS[:2], compile=True, **kw)) == \
        completions(generate(model, PROMPTS[:2], **kw))


# ---- the decode step that CUDA graphs replay, and the flash-attn decode ------------------------------

LONG = [torch.randint(0, 61, (k,), generator=torch.Generator().manual_seed(k)).tolist() for k in (270, 3, 140, 33)]
LIMITS = [40, 12, 30, 8]


def spy_decode(monkeypatch):
    """Record (width, attended cache length) of every decode step."""
    shapes, real = [], rollout._decode

    def spy(model, tok, pos, cache, *args):
        shapes.append((tok.size(0), cache.length))
        return real(model, tok, pos, cache, *args)
    monkeypatch.setattr(rollout, "_decode", spy)
    return shapes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_decode_step_equals_naive_sampling_through_batching_packing_and_long_prefixes(monkeypatch, temperature):
    """The decode step a CUDA graph captures (fixed buffers, no host sync, the cache prefix rounded by
    attend_length) gives the naive oracle's tokens and log-probs: prompts of 3 to 270 tokens, a limit per
    prompt, 12 rows through 5 slots (continuous batching, then packing), attended lengths past 256 where the
    rounding is coarser than 16. The steps run in few distinct (width, length) shapes: a graph each."""
    model = tiny(std=0.3)
    shapes = spy_decode(monkeypatch)
    ro = generate(model, LONG, n=3, max_new_tokens=LIMITS, temperature=temperature, seed=9, max_batch=5)
    ref = naive(model, LONG, 3, LIMITS, temperature, seed=9)
    assert completions(ro) == [toks for toks, _ in ref]
    assert ro.finished.tolist() == [toks[-1] == EOS for toks, _ in ref]
    for i, (_, lps) in enumerate(ref):
        torch.testing.assert_close(ro.logprobs[i, :len(lps)], torch.tensor(lps), atol=1e-4, rtol=1e-4)
    widths, lengths = {w for w, _ in shapes}, {n for _, n in shapes}
    assert 5 in widths and len(widths) >= 2, "the test needs full-width steps and packed ones"
    assert 288 in lengths, "the test needs a length rounded to a multiple of 32 (past 256)"
    assert len(set(shapes)) <= len(shapes) // 3


def test_attend_length_pads_at_most_an_eighth_in_few_lengths():
    S = 5000
    lengths = [attend_length(n, S) for n in range(1, S + 1)]
    assert all(n <= m <= S and m - n <= max(rollout.PREFIX_ROUND - 1, n // 8) for n, m in enumerate(lengths, 1))
    assert len(set(lengths)) <= 60  # about 8 per doubling from 128 up, plus multiples of 16 below


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        generate(tiny(), PROMPTS, n=1, max_new_tokens=2, cuda_graphs=True)


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, k, v, cache_seqlens):
    """flash_attn_with_kvcache as flash-attn documents it, in plain torch: q (B, 1, nh, hd); caches (B, S, nkv,
    hd) with a contiguous last dim; k, v (B, 1, nkv, hd) are written into the caches at index cache_seqlens[b]
    (int32), then query b attends over cache positions [0, cache_seqlens[b]]; query head h reads kv head
    h // (nh / nkv)."""
    B, _, nh, hd = q.shape
    nkv = k_cache.size(2)
    assert k_cache.shape == v_cache.shape and k_cache.shape[0] == B and k_cache.shape[2:] == (nkv, hd)
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1 and k.shape == v.shape == (B, 1, nkv, hd)
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous() and cache_seqlens.shape == (B,)
    out = torch.empty_like(q)
    for b in range(B):
        n = int(cache_seqlens[b])
        k_cache[b, n], v_cache[b, n] = k[b, 0], v[b, 0]
        for h in range(nh):
            g = h // (nh // nkv)
            w = (k_cache[b, :n + 1, g] @ q[b, 0, h] * hd ** -0.5).softmax(0)  # (n + 1,)
            out[b, 0, h] = w @ v_cache[b, :n + 1, g]
    return out


def test_flash_decode_path_equals_the_sdpa_decode(monkeypatch):
    """model.py's flash_attn_with_kvcache call (cache views in its layout, each row's position as its cache
    length, the kernel writing the new keys and values) gives the SDPA decode's tokens and log-probs, with
    the kernel replaced by a reference of its documented semantics, GQA included (4 query heads, 2 kv heads).
    The decode steps then take the whole cache: the kernel reads each row's own length, so one graph a width."""
    model = tiny(std=0.3)
    kw = dict(n=3, max_new_tokens=LIMITS, temperature=1.0, seed=4, max_batch=5)
    sdpa = generate(model, LONG, **kw)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return flash_attn_with_kvcache_reference(*args, **kwargs)
    monkeypatch.setattr(model_py, "flash_decode", lambda device, dtype: True)
    monkeypatch.setattr(model_py, "flash_attn_with_kvcache", kernel)
    shapes = spy_decode(monkeypatch)
    flash = generate(model, LONG, **kw)
    assert calls and {n for _, n in shapes} == {max(len(p) + lim for p, lim in zip(LONG, LIMITS))}
    assert completions(flash) == completions(sdpa)
    torch.testing.assert_close(flash.logprobs, sdpa.logprobs, atol=1e-5, rtol=1e-5)
