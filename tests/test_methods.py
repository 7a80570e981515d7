"""The length-control options of train.Config, each against values computed by hand: truncation policies,
length penalties, advantage normalisations, clip-higher, loss aggregation, dynamic sampling and
per-problem limits (DESIGN.md, "Length-control methods: where each choice lives")."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from config import load_config
from distributed import Dist
from model import ModelArgs, Transformer
from rollout import generate
from tiny_run import finish_reward, make_tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
ONE = Dist(0, 1, torch.device("cpu"))


def cfg(**kw):
    return train.Config(**kw)


def shaped(reward, correct, finished, lengths, limit=10, **kw):
    t = torch.tensor
    return train.shape_rewards(t([reward], dtype=torch.float32), t([correct], dtype=torch.float32),
                               t([finished]), t([lengths]), t([[limit] * len(lengths)]), cfg(**kw))


# ---- truncation -----------------------------------------------------------------------------------------

def test_truncation_policies_on_hand_made_rows():
    """Rows: right and finished, right but cut, wrong and finished, right-as-cut-text and cut. reward is the
    verdict with the cutoff, correct the verdict on the text as it stands."""
    args = ([1, 0, 0, 0], [1, 1, 0, 1], [True, False, True, False], [6, 10, 7, 10])
    r, valid = shaped(*args, truncation="zero")
    assert r.tolist() == [[1, 0, 0, 0]] and valid.all()
    r, valid = shaped(*args, truncation="keep")
    assert r.tolist() == [[1, 1, 0, 1]] and valid.all()
    r, valid = shaped(*args, truncation="mask")
    assert valid.tolist() == [[True, False, True, False]] and r.tolist() == [[1, 0, 0, 0]]


def test_soft_overlong_term_at_the_buffer_edges():
    """DAPO: 0 up to L - buffer, linear to -1 at L, -1 for a cut completion; added to correctness."""
    L, buf = 10, 4
    lengths = [5, 6, 8, 10, 10]  # inside, at the edge, half-way into the buffer, finished at L, cut at L
    r, _ = shaped([1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [True, True, True, True, False], lengths, L,
                  truncation="soft", soft_buffer=buf)
    assert r[0].tolist() == pytest.approx([1, 1, 0.5, 0, 0])  # the cut one: 1 (as it stands) - 1


# ---- length penalties -----------------------------------------------------------------------------------

def test_kimi_length_reward():
    """lambda = 0.5 - (len - min) / (max - min); correct rows get lambda, wrong ones min(0, lambda)."""
    lengths, correct = [10, 20, 30, 30], [1, 1, 0, 0]
    r, _ = shaped(correct, correct, [True] * 4, lengths, 100, length_penalty="kimi", length_coef=0.2)
    lam = [0.5, 0.0, -0.5, -0.5]
    expected = [c + 0.2 * (l if c else min(0, l)) for c, l in zip(correct, lam)]
    assert r[0].tolist() == pytest.approx(expected)
    r, _ = shaped([1, 0], [1, 0], [True, True], [7, 7], 100, length_penalty="kimi", length_coef=0.2)
    assert r[0].tolist() == [1, 0]  # equal lengths: no term


def test_arora_zanette_length_reward():
    """Correct rows x (1 - alpha * sigmoid(z)), z = the length's z-score among the group's correct rows."""
    lengths, correct = [10, 20, 30, 5], [1, 1, 1, 0]
    r, _ = shaped(correct, correct, [True] * 4, lengths, 100, length_penalty="arora", length_coef=0.5)
    mean, std = 20.0, math.sqrt(200 / 3)  # population std of 10, 20, 30
    sig = [1 / (1 + math.exp(-(x - mean) / std)) for x in (10, 20, 30)]
    assert r[0].tolist() == pytest.approx([1 - 0.5 * s for s in sig] + [0], abs=1e-5)


# ---- advantages -----------------------------------------------------------------------------------------

def test_advantage_normalisations_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]])
    valid, use = torch.ones(2, 4, dtype=torch.bool), torch.ones(2)
    c = rewards - rewards.mean(1, keepdim=True)  # [[.75, -.25, -.25, -.25], [.5, .5, -.5, -.5]]
    adv, signal = train.advantages(rewards, valid, use, cfg(adv_norm="none"), ONE)
    assert torch.allclose(adv, c) and signal.all()
    adv, _ = train.advantages(rewards, valid, use, cfg(adv_norm="group"), ONE)
    assert torch.allclose(adv, c / (c.std(1, keepdim=True) + 1e-6))
    adv, _ = train.advantages(rewards, valid, use, cfg(adv_norm="batch"), ONE)
    batch_std = math.sqrt((c ** 2).sum() / 7)  # over all 8 rows of the step, unbiased
    assert torch.allclose(adv, c / (batch_std + 1e-6))
    # a group left out of the update does not enter the batch std
    adv, _ = train.advantages(rewards, valid, torch.tensor([1.0, 0.0]), cfg(adv_norm="batch"), ONE)
    assert torch.allclose(adv[0], c[0] / (math.sqrt((c[0] ** 2).sum() / 3) + 1e-6))


def test_masked_row_does_not_move_its_group_mean():
    """With truncation="mask" a cut row is out of the group's statistics: the others are centred on
    their own mean, and the masked row's advantage is 0."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, True]])
    adv, signal = train.advantages(rewards, valid, torch.ones(1), cfg(adv_norm="none"), ONE)
    assert adv[0].tolist() == pytest.approx([2 / 3, -1 / 3, 0, -1 / 3]) and signal.all()
    _, signal = train.advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), torch.ones(1),
                                 cfg(), ONE)
    assert not signal.any()  # one valid row: nothing to compare


def test_zero_weight_rows_get_no_gradient():
    """A row that is not in the loss (weight 0: masked, or padding) contributes no gradient."""
    logp = torch.zeros(2, 3, requires_grad=True)
    weight = torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.0, 0.0]])
    loss, _ = train.grpo_loss(logp, torch.zeros(2, 3), None, torch.zeros(2, 3), torch.tensor([1.0, -5.0]),
                              weight, 0.2, 0.2, 0.0, 0.0)
    loss.backward()
    assert logp.grad[1].abs().sum() == 0 and logp.grad[0].abs().sum() > 0


# ---- clip-higher ----------------------------------------------------------------------------------------

def test_asymmetric_clip_clips_where_it_should_on_both_sides():
    """clip_low 0.2, clip_high 0.28: a positive advantage stops pushing past 1.28 (not 1.2); a negative one
    stops pulling below 0.8. The gradient is zero exactly on the clipped tokens, and they are counted."""
    ratios = torch.tensor([0.7, 0.85, 1.25, 1.35])
    for A, clipped in ((1.0, [False, False, False, True]), (-1.0, [True, False, False, False])):
        logp = torch.zeros(1, 4, requires_grad=True)
        loss, stats = train.grpo_loss(logp, -ratios.log()[None], None, torch.zeros(1, 4), torch.tensor([A]),
                                      torch.ones(1, 4), 0.2, 0.28, 0.0, 0.0)
        loss.backward()
        assert (logp.grad[0] == 0).tolist() == clipped
        assert (stats["clip_low"].item(), stats["clip_high"].item()) == ((1, 0) if A < 0 else (0, 1))


# ---- loss aggregation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregation_matches_its_formula(agg):
    """Two rows of 1 and 3 completion tokens with per-token losses x: token-mean sum(x) / 4; seq-mean-token-
    mean (x0 + mean(x1)) / 2; seq-mean-token-sum-norm (x0 + sum(x1)) / (L * 2), L = the limit (8)."""
    rows = train.Rows(prompts=[[1, 2], [1, 2]], tokens=[torch.tensor([5]), torch.tensor([5, 6, 7])],
                      old_logp=[torch.zeros(1), torch.zeros(3)], adv=torch.tensor([-1.0, -1.0]))
    w = train.row_weights(rows, [0, 1], cfg(loss_agg=agg, limit=8), ONE)
    x = torch.tensor([[2.0, 0, 0], [1.0, 3.0, 5.0]])  # per-token surrogate -A * ratio = x at logp = log x
    weight = torch.tensor([[w[0], 0, 0], [w[1]] * 3])
    loss, _ = train.grpo_loss(x.log(), torch.zeros(2, 3), None, torch.zeros(2, 3), torch.tensor([-1.0, -1.0]),
                              weight, 10.0, 10.0, 0.0, 0.0)
    expected = {"token-mean": (2 + 9) / 4, "seq-mean-token-mean": (2 + 3) / 2,
                "seq-mean-token-sum-norm": (2 + 9) / (8 * 2)}[agg]
    assert loss.item() == pytest.approx(expected)


def test_bad_choice_names_the_key_and_the_choices():
    for key, value in (("truncation", "drop"), ("adv_norm", "rank"), ("loss_agg", "sum"), ("length_penalty", "x")):
        with pytest.raises(ValueError, match=f"{key}='{value}': must be one of"):
            load_config(None, [f"--{key}={value}"], train.Config)
    with pytest.raises(ValueError, match="soft_buffer"):
        load_config(None, ["--truncation=soft"], train.Config)


# ---- per-problem limits ---------------------------------------------------------------------------------

def test_per_prompt_max_new_tokens_cuts_each_prompt_at_its_own_limit():
    model = Transformer(ModelArgs(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)).init_weights(seed=1)
    prompts = [[1, 2, 3], [4, 5]]
    ro = generate(model, prompts, n=2, max_new_tokens=[3, 7], eos_ids=(), seed=[11, 12])
    assert ro.lengths.tolist() == [3, 3, 7, 7] and not ro.finished.any()
    alone = generate(model, prompts[:1], n=2, max_new_tokens=3, eos_ids=(), seed=[11])
    assert torch.equal(ro.tokens[:2, :3], alone.tokens)  # the same samples as at its limit alone


def test_a_problem_limit_changes_the_prompt_and_the_cutoff(tmp_path):
    """A row with `limit` states its own limit in the system prompt and is cut there in training."""
    model_dir, _ = make_tiny(tmp_path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = cfg(limit=12, samples_per_prompt=4, device="cpu")
    problems = [{"id": "a", "problem": "1+1", "answer": "2", "limit": 3}, {"id": "b", "problem": "2+2", "answer": "4"}]
    prompts = [train.problem_prompt(tok, p, c) for p in problems]
    text = [tok.decode(p).replace(" ", "") for p in prompts]  # this character tokenizer drops spaces
    assert "within3tokens" in text[0] and "within12tokens" in text[1]
    model = Transformer.from_pretrained(model_dir)
    ro = train.rollout_round(model, tok, problems, prompts, [0, 1], [5, 6], [], c, finish_reward)
    assert ro["lengths"][0].tolist() == [3] * 4 and ro["lengths"][1].tolist() == [12] * 4  # no EOS: cut at each
    assert ro["limits"].tolist() == [[3] * 4, [12] * 4]


# ---- dynamic sampling -----------------------------------------------------------------------------------

def _tiny_cfg(tiny, out, *extra):
    model, data = tiny
    return load_config(TINY, [f"--model={model}", f"--train_data={data}", f"--out_dir={out}", *extra], train.Config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_dynamic_sampling_is_deterministic_and_stops_at_max_rounds(tiny, tmp_path):
    """At limit 3 a random model almost never stops in time: nearly every group is all cut off, so a step
    keeps drawing until max_sample_rounds. Two runs draw the same groups; a run without dynamic
    sampling draws one round per step."""
    extra = ("--steps=3", "--limit=3", "--dynamic_sampling=true", "--max_sample_rounds=2", "--kl_coef=0")
    runs = [[json.loads(x) for x in (Path(train.main(_tiny_cfg(tiny, tmp_path / f"r{i}", *extra),
                                                     reward_fn=finish_reward)) / "metrics.jsonl").read_text().splitlines()]
            for i in (0, 1)]
    keys = ("reward", "mean_len", "groups_drawn", "groups_kept", "sample_rounds")
    assert [[m[k] for k in keys] for m in runs[0]] == [[m[k] for k in keys] for m in runs[1]]
    for m in runs[0]:
        if m["groups_kept"] < 4:  # prompts_per_step in configs/tiny.py
            assert m["sample_rounds"] == 2 and m["groups_drawn"] == 8
    assert any(m["sample_rounds"] == 2 for m in runs[0])


@pytest.mark.slow
def test_dynamic_sampling_under_torchrun_two_ranks(tiny, tmp_path):
    """Both ranks agree on the rounds (a disagreement would hang a collective or fail the gather), and the
    step's groups stay split evenly: groups drawn is a multiple of prompts_per_step."""
    model, data = tiny
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "tiny_run.py"), TINY, f"--model={model}", f"--train_data={data}",
           f"--out_dir={tmp_path / 'two'}", "--steps=2", "--limit=4", "--dynamic_sampling=true",
           "--max_sample_rounds=3", "--adv_norm=batch", "--clip_eps_high=0.28"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["groups_drawn"] == 4 * m["sample_rounds"] for m in metrics)


def test_dler_config_is_thinkprunes_cutoff_with_dlers_optimisation():
    dler = load_config(str(ROOT / "configs" / "dler.py"), [], train.Config)
    stage1 = load_config(str(ROOT / "configs" / "stage1.py"), [], train.Config)
    assert (dler.limit, dler.truncation) == (stage1.limit, stage1.truncation) == (4000, "zero")
    assert (dler.adv_norm, dler.clip_eps, dler.clip_eps_high, dler.dynamic_sampling, dler.loss_agg) == \
        ("batch", 0.2, 0.28, True, "token-mean")


def test_recompute_old_logp_makes_the_first_ratio_one(tiny, tmp_path, monkeypatch):
    """Sampler log-probs that disagree with the trainer's (here: shifted by 0.5, as bf16 kernels might) put
    tokens outside the clip range at the first update; recomputed by the trainer's forward, none is."""
    real = train.generate

    def off_by_half(*args, **kwargs):
        ro = real(*args, **kwargs)
        ro.logprobs += 0.5 * (torch.arange(ro.logprobs.size(1)) % 2)  # every other token
        return ro
    monkeypatch.setattr(train, "generate", off_by_half)
    first = {}
    for on in (False, True):
        out = train.main(_tiny_cfg(tiny, tmp_path / str(on), "--steps=1", "--kl_coef=0",
                                   f"--recompute_old_logp={on}"), reward_fn=finish_reward)
        first[on] = json.loads((Path(out) / "metrics.jsonl").read_text())["ratio_out_first"]
    assert first[False] > 0.2 and first[True] == 0.0
