"""The wiring between the sampler and the loss, pinned against computations that do not go through it:
the micro-batch builder on hand-made rows, `update`'s gradient against the step's objective written out
from the plain forward (`model(ids)` logits -> log_softmax), the reference and the entropy bonus reaching
the gradient, micro-batches, minibatches, PPO epochs and activation checkpointing, and what `train_step`,
`main` and the schedule pass along (the limit, kept groups, warmup, dropped prompts, the KL reference).

Gradients are read by an SGD that records them before it steps (lr=0 leaves the weights where they were)."""

import contextlib
import copy
import io
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import schedule
import train
from config import load_config
from data import build_prompt, eos_ids
from distributed import Dist
from model import ModelArgs, Transformer
from tiny_run import make_tiny

ONE = Dist(0, 1, torch.device("cpu"))
ROOT = Path(__file__).resolve().parent.parent
EOS = 12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: threads only contend with the other engineers' jobs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it is asked to apply."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def tiny_model(seed=0, std=0.5):
    args = ModelArgs(vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, eos_token_id=EOS)
    return Transformer(args).init_weights(std=std, seed=seed)


def nearby(model, seed, scale=0.1):
    """A copy of `model` with every weight moved by scale x N(0, 1): a reference a few nats away."""
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def plain_logprobs(model, prompt, tokens, temperature):
    """Log-softmax over the vocabulary (C, V) at the C positions that predict `tokens`, from one plain forward."""
    seq = torch.tensor([prompt + tokens.tolist()])
    return F.log_softmax(model(seq)[0, len(prompt) - 1:-1].float() / temperature, -1)


def objective(model, rows, idx, cfg, ref=None):
    """The step's GRPO loss over rows idx written out row by row: clipped surrogate, k3 KL to `ref`, entropy
    bonus, summed over completion tokens (EOS included) and divided by all of idx's tokens. Also the k3 KL's
    token mean."""
    n_tok = sum(len(rows.tokens[i]) for i in idx)
    hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    loss, kl_sum = 0.0, 0.0
    for i in idx:
        lp = plain_logprobs(model, rows.prompts[i], rows.tokens[i], cfg.temperature)  # (C, V)
        logp = lp.gather(-1, rows.tokens[i][:, None])[:, 0]
        entropy = -(lp.exp() * lp).sum(-1)
        ratio = torch.exp(logp - rows.old_logp[i])
        A = rows.adv[i]
        pg = -torch.minimum(ratio * A, ratio.clamp(1 - cfg.clip_eps, 1 + hi) * A)
        kl = torch.zeros_like(logp)
        if ref is not None:
            with torch.no_grad():
                ref_logp = plain_logprobs(ref, rows.prompts[i], rows.tokens[i], cfg.temperature).gather(
                    -1, rows.tokens[i][:, None])[:, 0]
            kl = (ref_logp - logp).exp() - (ref_logp - logp) - 1
        loss = loss + (pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy).sum()
        kl_sum += float(kl.detach().sum())
    return loss / n_tok, kl_sum / n_tok


def objective_grad(model, rows, idx, cfg, ref=None):
    loss, _ = objective(model, rows, idx, cfg, ref)
    return torch.autograd.grad(loss, list(model.parameters()))


def hand_rows(model, temperature, old_shift=0.0, adv=(1.0, -0.5, 2.0, -1.5), seed=0):
    """Four rows with prompts of 3, 1, 5, 2 tokens and completions of 4, 2, 6, 3 tokens (rows 0 and 2 end
    with EOS, 1 and 3 were cut off at their limits), the old log-probs the model's own plus `old_shift` x noise."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    tokens = [torch.tensor([3, 7, 1, EOS]), torch.tensor([2, 9]), torch.tensor([4, 4, 0, 11, 6, EOS]),
              torch.tensor([8, 5, 10])]
    old = []
    with torch.no_grad():
        for p, t in zip(prompts, tokens):
            lp = plain_logprobs(model, p, t, temperature).gather(-1, t[:, None])[:, 0]
            old.append(lp + old_shift * torch.randn(len(t), generator=g))
    return train.Rows(prompts=prompts, tokens=tokens, old_logp=old, adv=torch.tensor(adv))


def cfg_for(**kw):
    base = dict(temperature=0.8, clip_eps=0.2, kl_coef=0.0, entropy_coef=0.0, grad_clip=0.0, micro_batch_size=4,
                minibatches=1, ppo_epochs=1, logprob_chunk=3, seed=0)
    return train.Config(**{**base, **kw})


def assert_grads_close(got, want, atol=1e-5, rtol=1e-4):
    assert any(w.abs().max() > 1e-3 for w in want), "the expected gradient is ~0: the test would test nothing"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---- the micro-batch builder -----------------------------------------------------------------------------

def test_micro_batch_lines_up_targets_old_logprobs_and_mask_by_hand():
    """Prompts of 3 and 1 tokens; row 0's completion ends with EOS. Position t predicts token t+1, so a
    completion's tokens are the targets from position P-1 on, its old log-probs sit at the same positions,
    and the mask covers exactly them, EOS included; the shorter sequence is right-padded."""
    rows = train.Rows(prompts=[[1, 2, 3], [4]], tokens=[torch.tensor([6, 7, EOS]), torch.tensor([8, 9])],
                      old_logp=[torch.tensor([-0.1, -0.2, -0.3]), torch.tensor([-0.4, -0.5])],
                      adv=torch.tensor([1.5, -2.0]))
    inputs, targets, mask, old, adv = train.micro_batch(rows, [1, 0], torch.device("cpu"))
    assert inputs.tolist() == [[4, 8, 0, 0, 0], [1, 2, 3, 6, 7]]
    assert targets.tolist() == [[8, 9, 0, 0, 0], [2, 3, 6, 7, EOS]]
    assert mask.tolist() == [[True, True, False, False, False], [False, False, True, True, True]]
    torch.testing.assert_close(old, torch.tensor([[-0.4, -0.5, 0, 0, 0], [0, 0, -0.1, -0.2, -0.3]]))
    assert adv.tolist() == [-2.0, 1.5]
    inputs, targets, mask, old, adv = train.micro_batch(rows, [], torch.device("cpu"))  # a rank with no rows
    assert mask.sum() == 0 and adv.tolist() == [0.0] and inputs.shape == (1, 1)


# ---- update: the gradient against the objective written out --------------------------------------------

def test_update_gradient_equals_the_step_objective_and_micro_batches_do_not_change_it():
    """Ratio away from 1 (clipping on both sides), KL to a different reference, entropy bonus: the gradient
    `update` hands the optimizer equals the gradient of the whole step's loss (token-mean over every row),
    whether the rows go through in one micro-batch or in micro-batches of 1 and 3 (each divided by the
    step's 15 tokens, not its own); the reported loss and KL are the step's."""
    model = tiny_model(seed=0)
    ref = nearby(model, seed=1)
    rows = hand_rows(model, 0.8, old_shift=0.3)
    runs = {}
    for mbs in (4, 3):  # chunks of 4, then of 3 + 1 (rows in a seeded order)
        cfg = cfg_for(kl_coef=0.3, entropy_coef=0.05, micro_batch_size=mbs)
        opt = RecordingSGD(model.parameters(), lr=0.0)
        runs[mbs] = (train.update(model, ref, opt, rows, [0, 1, 2, 3], cfg, ONE, step=0), opt.grads)
    loss, kl = objective(model, rows, [0, 1, 2, 3], cfg, ref)
    want = torch.autograd.grad(loss, list(model.parameters()))
    for stats, grads in runs.values():
        assert len(grads) == 1 and stats["optimizer_steps"] == 1
        assert_grads_close(grads[0], want)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
        assert stats["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-3
        assert stats["clip_low"] > 0 and stats["clip_high"] > 0  # the clip is really exercised


def test_first_update_ratio_is_one_and_stays_unclipped():
    """Old log-probs equal to the policy's own at the training temperature: every token's ratio is 1 at
    the first update, so nothing is clipped even at clip_eps=1e-3, and the gradient is the plain policy
    gradient -A * grad(logp) (token-mean)."""
    model = tiny_model(seed=2)
    rows = hand_rows(model, 0.8)
    cfg = cfg_for(clip_eps=1e-3)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    stats = train.update(model, None, opt, rows, [0, 1, 2, 3], cfg, ONE, step=0)
    assert stats["clip_low"] == 0 and stats["clip_high"] == 0
    pg = sum(-rows.adv[i] * plain_logprobs(model, rows.prompts[i], rows.tokens[i], 0.8).gather(
        -1, rows.tokens[i][:, None]).sum() for i in range(4)) / 15
    assert_grads_close(opt.grads[0], torch.autograd.grad(pg, list(model.parameters())))


def test_kl_term_is_zero_against_itself_and_pulls_toward_a_different_reference():
    """No advantage: the gradient is the KL term's alone. A reference equal to the policy gives KL 0 and
    no gradient; a different reference gives the k3 gradient toward it, and the KL metric is its token-mean."""
    model = tiny_model(seed=3)
    rows = hand_rows(model, 0.8, adv=(0.0, 0.0, 0.0, 0.0))
    cfg = cfg_for(kl_coef=1.0)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    same = train.update(model, copy.deepcopy(model), opt, rows, [0, 1, 2, 3], cfg, ONE, step=0)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and all(g.abs().max() < 1e-7 for g in opt.grads[0])
    ref = nearby(model, seed=4)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    other = train.update(model, ref, opt, rows, [0, 1, 2, 3], cfg, ONE, step=0)
    _, kl = objective(model, rows, [0, 1, 2, 3], cfg, ref)
    assert other["kl"] == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert_grads_close(opt.grads[0], objective_grad(model, rows, [0, 1, 2, 3], cfg, ref))


def test_entropy_bonus_gradient_matches_a_finite_difference():
    """No advantage, no KL, entropy_coef 1: the loss is minus the token-mean entropy, so the gradient along a
    random direction v equals -(H(w + eps v) - H(w - eps v)) / 2 eps, H from a float64 copy of the plain forward."""
    model = tiny_model(seed=5)
    rows = hand_rows(model, 0.8, adv=(0.0, 0.0, 0.0, 0.0))
    opt = RecordingSGD(model.parameters(), lr=0.0)
    stats = train.update(model, None, opt, rows, [0, 1, 2, 3], cfg_for(entropy_coef=1.0), ONE, step=0)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]

    def mean_entropy(eps):
        m = copy.deepcopy(model).double()
        with torch.no_grad():
            for p, dv in zip(m.parameters(), v):
                p.add_(eps * dv)
            h = 0.0
            for i in range(4):
                seq = torch.tensor([rows.prompts[i] + rows.tokens[i].tolist()])
                lp = F.log_softmax(m(seq)[0, len(rows.prompts[i]) - 1:-1] / 0.8, -1)
                h += float(-(lp.exp() * lp).sum())
        return h / 15

    eps = 1e-4
    fd = -(mean_entropy(eps) - mean_entropy(-eps)) / (2 * eps)
    got = sum(float((gr.double() * dv).sum()) for gr, dv in zip(opt.grads[0], v))
    assert abs(fd) > 1e-2, "the entropy barely depends on the weights: the test would test nothing"
    assert got == pytest.approx(fd, rel=1e-3)
    assert stats["entropy"] == pytest.approx(mean_entropy(0.0), rel=1e-5)


def test_minibatches_are_separate_optimizer_steps_each_over_its_own_tokens():
    """minibatches=2 over 4 rows: two optimizer steps, each the gradient of the token-mean loss over its own
    two rows, the two halves disjoint (which rows land together is the seeded order's business)."""
    model = tiny_model(seed=6)
    rows = hand_rows(model, 0.8, old_shift=0.2)
    cfg = cfg_for(minibatches=2, kl_coef=0.1, entropy_coef=0.01)
    ref = nearby(model, seed=7)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    stats = train.update(model, ref, opt, rows, [0, 1, 2, 3], cfg, ONE, step=0)
    assert stats["optimizer_steps"] == 2 and len(opt.grads) == 2
    halves = {}
    for pair in itertools.combinations(range(4), 2):
        halves[pair] = objective_grad(model, rows, list(pair), cfg, ref)

    def which(grads):
        hits = [pair for pair, want in halves.items()
                if all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads, want))]
        assert len(hits) == 1, f"the gradient is no half's token-mean gradient: {hits}"
        return set(hits[0])

    first, second = which(opt.grads[0]), which(opt.grads[1])
    assert first | second == {0, 1, 2, 3}


def test_second_ppo_epoch_uses_the_updated_policy_against_the_rollout_logprobs():
    """ppo_epochs=2: the second optimizer step's gradient is the objective's at the weights after the first
    step, with the rollout's old log-probs (so its ratios are no longer 1), not a fresh ratio-1 gradient."""
    model = tiny_model(seed=8)
    rows = hand_rows(model, 0.8)  # ratio 1 at the first epoch
    cfg = cfg_for(ppo_epochs=2, clip_eps=10.0)  # clipping off: the ratio shows in the gradient
    start = copy.deepcopy(model)
    opt = RecordingSGD(model.parameters(), lr=0.5)
    stats = train.update(model, None, opt, rows, [0, 1, 2, 3], cfg, ONE, step=0)
    assert stats["optimizer_steps"] == 2
    assert_grads_close(opt.grads[0], objective_grad(start, rows, [0, 1, 2, 3], cfg))
    moved = copy.deepcopy(start)
    with torch.no_grad():
        for p, gr in zip(moved.parameters(), opt.grads[0]):
            p.sub_(0.5 * gr)
    want = objective_grad(moved, rows, [0, 1, 2, 3], cfg)
    assert_grads_close(opt.grads[1], want)
    fresh = hand_rows(moved, 0.8)  # what a wrongly refreshed old log-prob would give
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(want, objective_grad(moved, fresh, [0, 1, 2, 3], cfg)))


def test_activation_checkpointing_recomputes_each_block_and_keeps_the_gradient(tmp_path):
    """load_model(activation_checkpointing=True): each block's forward runs again in backward (counted on a
    block's MLP), and the gradient is the same as without."""
    path = tmp_path / "m"
    src = tiny_model(seed=9)
    src.save_pretrained(path)
    rows = hand_rows(src, 0.8, old_shift=0.2)
    grads, calls = {}, {}
    for ac in (False, True):
        model = train.load_model(path, ONE, trainable=True, activation_checkpointing=ac)
        n = [0]
        model.layers[1].mlp.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        opt = RecordingSGD(model.parameters(), lr=0.0)
        train.update(model, None, opt, rows, [0, 1, 2, 3], cfg_for(micro_batch_size=2), ONE, step=0)
        grads[ac], calls[ac] = opt.grads[0], n[0]
    assert calls == {False: 2, True: 4}  # two micro-batches; checkpointing runs each block twice
    assert_grads_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)


# ---- train_step: the rollout's rows into the update ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def step_setup(tiny, **kw):
    from transformers import AutoTokenizer
    base, _ = tiny
    tok = AutoTokenizer.from_pretrained(base)
    model = Transformer.from_pretrained(base).init_weights(std=0.3, seed=1)  # peaked enough that T matters
    cfg = train.Config(**{**dict(limit=6, prompts_per_step=3, samples_per_prompt=4, temperature=0.7, kl_coef=0.0,
                                 entropy_coef=0.0, micro_batch_size=5, rollout_batch=12, grad_clip=0.0, seed=0,
                                 clip_eps=1e-3, recompute_old_logp=False, system_prompt="Limit {L}."), **kw})
    problems = [{"id": "a", "problem": "1+1", "answer": "2", "limit": 4},
                {"id": "b", "problem": "2+2", "answer": "const"}, {"id": "c", "problem": "3+5", "answer": "8"}]
    prompts = [train.problem_prompt(tok, p, cfg) for p in problems]
    return model, tok, problems, prompts, eos_ids(tok, model.args.eos_token_id), cfg


def parity_reward(text, gold, finished):
    """Constant for gold "const" (a group with no signal); else the parity of the text's character codes."""
    return 0.5 if gold == "const" else float(sum(map(ord, text)) % 2)


@pytest.mark.parametrize("skip", [True, False])
def test_train_step_passes_limits_keeps_groups_with_signal_and_starts_at_ratio_one(tiny, monkeypatch, skip):
    """One train_step on a tiny model at temperature 0.7: generate gets each problem's limit as its
    max_new_tokens (4 for the problem that has one, cfg.limit for the others), no row is longer, a row without
    EOS is exactly its limit long; the update gets the rows of groups whose rewards differ (all rows without
    skip_zero_var_groups), recomputed here from the rows' decoded text; and at the first update every
    completion token's log-prob equals the rollout's (ratio 1), EOS included."""
    model, tok, problems, prompts, eos, cfg = step_setup(tiny, skip_zero_var_groups=skip)
    seen = {}
    real_generate, real_update, real_loss = train.generate, train.update, train.grpo_loss

    def generate(*a, **kw):
        seen["max_new_tokens"] = kw["max_new_tokens"]
        seen["prompts"] = a[1]
        return real_generate(*a, **kw)

    def update(model, ref, opt, rows, keep, *rest):
        seen["rows"], seen["keep"] = rows, keep
        return real_update(model, ref, opt, rows, keep, *rest)

    def grpo_loss(logp, old, ref_logp, entropy, adv, weight, *rest):
        seen.setdefault("ratio", []).append((logp - old)[weight > 0].detach())
        return real_loss(logp, old, ref_logp, entropy, adv, weight, *rest)

    monkeypatch.setattr(train, "generate", generate)
    monkeypatch.setattr(train, "update", update)
    monkeypatch.setattr(train, "grpo_loss", grpo_loss)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    metrics, _, pos = train.train_step(model, None, opt, tok, problems, prompts, eos, cfg, ONE, 0, 0, parity_reward)
    assert pos == 3
    limit_of = {tuple(prompts[k]): problems[k].get("limit", cfg.limit) for k in range(3)}
    assert seen["max_new_tokens"] == [limit_of[tuple(p)] for p in seen["prompts"]]
    assert sorted(set(seen["max_new_tokens"])) == [4, 6]

    rows, G = seen["rows"], cfg.samples_per_prompt
    rewards, gold = [], {tuple(p): q["answer"] for p, q in zip(prompts, problems)}
    for i, toks in enumerate(rows.tokens):
        finished = int(toks[-1]) in eos
        assert len(toks) <= limit_of[tuple(rows.prompts[i])]
        assert finished or len(toks) == limit_of[tuple(rows.prompts[i])]
        rewards.append(parity_reward(tok.decode(toks.tolist(), skip_special_tokens=True), gold[tuple(rows.prompts[i])],
                                     finished))
    varied = [len(set(rewards[g * G:(g + 1) * G])) > 1 for g in range(3)]
    assert not all(varied) and any(varied), f"the test needs groups with and without signal: {rewards}"
    want = [i for i in range(3 * G) if varied[i // G] or not skip]
    assert sorted(seen["keep"]) == want
    assert metrics["zero_var_groups"] == varied.count(False) and metrics["groups_kept"] == len(want) // G
    ratios = torch.cat(seen["ratio"])
    assert len(ratios) == sum(len(rows.tokens[i]) for i in want)
    assert ratios.abs().max() < 1e-4  # log ratio 0: same positions, same temperature as the sampler
    assert metrics["clip_low"] == metrics["clip_high"] == metrics["ratio_out_first"] == 0


def test_recompute_old_logp_replaces_the_old_logprobs_by_the_plain_forward():
    """recompute_old_logp: each kept row's old log-probs become the model's own at the training temperature
    (one per completion token, EOS included); rows not kept are left alone."""
    model = tiny_model(seed=10)
    rows = hand_rows(model, 0.8, old_shift=1.0)
    before = [o.clone() for o in rows.old_logp]
    train.recompute_old_logp(model, rows, [2, 0, 3], cfg_for(micro_batch_size=2), ONE)
    for i in (0, 2, 3):
        want = plain_logprobs(model, rows.prompts[i], rows.tokens[i], 0.8).gather(-1, rows.tokens[i][:, None])[:, 0]
        torch.testing.assert_close(rows.old_logp[i], want.detach(), atol=1e-5, rtol=1e-5)
        assert (before[i] - want).abs().max() > 0.1
    assert torch.equal(rows.old_logp[1], before[1])


# ---- main: warmup, dropped prompts, the reference ---------------------------------------------------------

@pytest.fixture(scope="module")
def main_run(tiny, tmp_path_factory):
    """train.main for 2 steps with warmup_steps=4, kl_coef > 0, activation checkpointing and 3 of 9 problems
    whose prompts are longer than max_prompt_tokens; what generate, load_model and the optimizer were given
    is recorded."""
    from transformers import AutoTokenizer
    base, _ = tiny
    root = tmp_path_factory.mktemp("main")
    tok = AutoTokenizer.from_pretrained(base)
    short = [{"id": f"s{i}", "problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(6)]
    long = [{"id": f"l{i}", "problem": f"{i}+{i} " + "and one more " * 20, "answer": "0"} for i in range(3)]
    rows = short[:2] + long[:1] + short[2:4] + long[1:] + short[4:]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(str(ROOT / "configs" / "tiny.py"), [f"--model={base}", f"--train_data={root / 'p.jsonl'}",
                      f"--out_dir={root / 'out'}", "--steps=2", "--warmup_steps=4", "--save_every=0",
                      "--samples_per_prompt=4", "--limit=8", "--activation_checkpointing=true",
                      "--system_prompt=Limit {L}."], train.Config)
    lens = {r["id"]: len(build_prompt(tok, r["problem"], cfg.limit, cfg.system_prompt)) for r in rows}
    cfg.max_prompt_tokens = max(lens[r["id"]] for r in short)
    assert min(lens[r["id"]] for r in long) > cfg.max_prompt_tokens
    rec = {"generate": [], "load": [], "update": []}
    real_generate, real_load, real_update = train.generate, train.load_model, train.update

    def generate(model, prompts, **kw):
        rec["generate"].append((prompts, kw["max_new_tokens"]))
        return real_generate(model, prompts, **kw)

    def load_model(path, d, trainable, activation_checkpointing=False):
        rec["load"].append((str(path), trainable, activation_checkpointing))
        return real_load(path, d, trainable, activation_checkpointing)

    def update(model, ref, opt, *rest):
        rec["update"].append((opt.param_groups[0]["lr"], ref))
        return real_update(model, ref, opt, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "generate", generate)
        mp.setattr(train, "load_model", load_model)
        mp.setattr(train, "update", update)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train.main(cfg, reward_fn=parity_reward)
    metrics = [json.loads(x) for x in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    return cfg, rec, out.getvalue(), metrics, {tuple(build_prompt(tok, r["problem"], cfg.limit, cfg.system_prompt))
                                               for r in short}


def test_warmup_ramps_the_learning_rate_the_optimizer_uses(main_run):
    """warmup_steps=4: steps 1 and 2 train at lr/4 and 2 lr/4 (linear from lr/4 to lr at step 4)."""
    cfg, rec, _, metrics, _ = main_run
    want = [cfg.lr * 1 / 4, cfg.lr * 2 / 4]
    assert [lr for lr, _ in rec["update"]] == pytest.approx(want) and [m["lr"] for m in metrics] == pytest.approx(want)


def test_prompts_over_max_prompt_tokens_are_dropped_and_counted(main_run):
    """The 3 long prompts are dropped before training, and said so; the rollouts draw only short ones."""
    cfg, rec, out, _, short = main_run
    assert f"dropped 3 of 9 prompts longer than max_prompt_tokens={cfg.max_prompt_tokens}" in out
    drawn = [tuple(p) for prompts, _ in rec["generate"] for p in prompts]
    assert len(drawn) == 2 * cfg.prompts_per_step and set(drawn) <= short


def test_training_rollouts_get_the_limit_and_the_reference_is_the_starting_model(main_run):
    """Every rollout call gets cfg.limit per prompt; the KL reference is cfg.model, frozen: KL 0 at step 1
    (policy and reference are the same weights), > 0 once the policy has taken a step."""
    cfg, rec, _, metrics, _ = main_run
    assert all(lims == [cfg.limit] * len(prompts) for prompts, lims in rec["generate"])
    # the policy (checkpointed as configured), then the frozen reference, both from the starting model
    assert rec["load"] == [(cfg.model, True, True), (cfg.model, False, False)]
    assert all(ref is not None and not any(p.requires_grad for p in ref.parameters()) for _, ref in rec["update"])
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-7) and metrics[1]["kl"] > 1e-6  # equal, then moved apart


# ---- the schedule: each stage's reference is its starting model ------------------------------------------

def test_each_schedule_stage_takes_its_starting_model_as_kl_reference(tmp_path, monkeypatch):
    """A two-stage tiny schedule with kl_coef > 0: stage 1 trains from the original model with it as KL
    reference; stage 2 trains from stage 1's selected checkpoint and its KL reference is that checkpoint, not
    the original."""
    from test_schedule import stop_reward, tiny_setup
    cfg = load_config(str(ROOT / "configs" / "tiny_schedule.py"), tiny_setup(tmp_path) + [
        "--budgets=[]", "--val_n_problems=2", "--val_samples=2", "--val_max_new_tokens=8", "--report=false",
        '--stages=[{"limit": 8, "steps": 1}, {"limit": 6, "steps": 1}]'], schedule.ScheduleConfig)
    cfg.train.update(kl_coef=0.01, save_every=1)
    loads, real_load = [], train.load_model

    def load_model(path, d, trainable, activation_checkpointing=False):
        loads.append((str(path), trainable))
        return real_load(path, d, trainable, activation_checkpointing)

    monkeypatch.setattr(train, "load_model", load_model)
    state = schedule.run_schedule(cfg, train_fn=lambda c: train.main(c, reward_fn=stop_reward))
    s1, s2 = state["stages"]
    assert s1["start"] == cfg.model and s2["start"] == s1["selected"]["path"] != cfg.model
    assert loads == [(cfg.model, True), (cfg.model, False), (s2["start"], True), (s2["start"], False)]
