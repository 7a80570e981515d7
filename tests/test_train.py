"""train.py: the GRPO loss and its pieces against hand computation, the config rules, a short run that
must raise a toy reward, and (slow) FSDP on 2 CPU processes and resume after a real SIGKILL.

The runs use tests/tiny_run.py: a random 2-layer model with a character tokenizer and the reward
"1 if EOS came within the limit" (ThinkPrune's cutoff without the answer check)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import reward
import train
from config import load_config
from data import batch_indices
from distributed import Dist
from model import ModelArgs, Transformer, logprobs
from tiny_run import finish_reward, make_tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def tiny_cfg(tiny, out_dir, *overrides):
    model, data = tiny
    return load_config(TINY, [f"--model={model}", f"--train_data={data}", f"--out_dir={out_dir}", *overrides], train.Config)


# ---- the loss ----------------------------------------------------------------------------------------

def test_loss_matches_hand_computation():
    """Clipped surrogate, k3 KL added to the loss, entropy bonus, divided by the token count."""
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    old = logp - torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.5, 0.5, 1.0]]))  # ratios as written
    ref = logp + torch.tensor([[0.0, math.log(2), 0.0], [0.0, 0.0, math.log(2)]])
    entropy = torch.ones(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])  # row 1's last position is padding
    loss, stats = train.grpo_loss(logp, old, ref, entropy, adv, weight=mask / 5, clip_low=0.2, clip_high=0.2,
                                  kl_coef=0.1, entropy_coef=0.01)
    # row 0 (A=+1): r=1 -> -1; r=1.5 clipped to 1.2 -> -1.2; r=0.5 -> -min(0.5, 0.8) = -0.5
    # row 1 (A=-2): r=1.5 -> -min(-3, -2.4) = 3; r=0.5 -> -min(-1, -1.6) = 1.6; masked token ignored
    pg = -1 - 1.2 - 0.5 + 3 + 1.6
    k3 = 2 - math.log(2) - 1  # exp(log 2) - log 2 - 1, once among the unmasked tokens
    expected = (pg + 0.1 * k3 - 0.01 * 5) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-6) and stats["entropy"].item() == pytest.approx(5.0)
    assert (stats["clip_low"].item(), stats["clip_high"].item()) == (1, 1)  # row 1's r=0.5 (A<0), row 0's r=1.5


def test_unfinished_completion_gets_zero_reward_and_negative_advantage():
    """The same right answer scores 1 when finished and 0 when cut off; in a mixed group the cut-off
    one is pushed down. A group with all-equal rewards is flagged as carrying no signal."""
    text = "so the answer is \\boxed{42}"
    rewards = torch.tensor([[reward.score(text, "42", True), reward.score(text, "42", False),
                             reward.score(text, "42", True), reward.score("\\boxed{41}", "42", True)],
                            [0.0, 0.0, 0.0, 0.0]])
    assert rewards[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    valid, use, d = torch.ones(2, 4, dtype=torch.bool), torch.ones(2), Dist(0, 1, torch.device("cpu"))
    adv, signal = train.advantages(rewards, valid, use, train.Config(adv_norm="group"), d)
    assert adv[0, 1] < 0 < adv[0, 0]
    assert adv[0].tolist() == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)  # unbiased std 0.577
    assert signal.tolist() == [True, False] and adv[1].abs().sum() == 0
    adv_plain, _ = train.advantages(rewards, valid, use, train.Config(adv_norm="none"), d)
    assert adv_plain[0].tolist() == [0.5, -0.5, 0.5, -0.5]


def test_kl_gradient_pulls_toward_reference():
    """With no advantage, gradient descent on the loss moves the policy's log-probs toward the
    reference's, from above and from below (the official ThinkPrune code had this sign wrong)."""
    for gap in (+1.0, -1.0):
        logits = torch.zeros(1, 1, 5, requires_grad=True)
        ref_logits = torch.zeros(1, 1, 5)
        ref_logits[..., 0] = gap  # reference likes token 0 more (gap>0) or less (gap<0) than the policy
        target = torch.zeros(1, 1, dtype=torch.long)
        opt = torch.optim.SGD([logits], lr=0.5)
        dist_before = None
        for _ in range(5):
            logp, ent = logprobs(logits, target)
            ref_logp, _ = logprobs(ref_logits, target)
            loss, _ = train.grpo_loss(logp, logp.detach(), ref_logp, ent, torch.zeros(1), torch.ones(1, 1),
                                      0.2, 0.2, kl_coef=1.0, entropy_coef=0.0)
            gap_now = (ref_logp - logp).item()
            assert dist_before is None or abs(gap_now) < dist_before
            dist_before = abs(gap_now)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_logprobs_match_plain_log_softmax(tied):
    """The model's chunked, checkpointed fp32 log-probs at temperature T (targets of the last k positions)
    equal log_softmax(logits / T) gathered from the plain forward, in value and in every parameter's
    gradient; entropies equal the entropies of softmax(logits / T), gradient included."""
    args = ModelArgs(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=tied)
    model = Transformer(args).init_weights(std=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(0, 11, (2, 7), generator=g), torch.randint(0, 11, (2, 5), generator=g)
    w = torch.arange(10.).view(2, 5)  # a weight per position, so a misplaced chunk changes the gradient
    logp, ent = model(inputs, targets=targets, temperature=0.7, chunk=3, entropy_grad=True)
    g1 = torch.autograd.grad((logp * w).sum() + ent.sum(), list(model.parameters()))
    ref_lp = F.log_softmax(model(inputs)[:, 2:] / 0.7, -1)  # (2, 5, V): the last 5 positions
    ref = ref_lp.gather(-1, targets[..., None])[..., 0]
    ref_ent = -(ref_lp.exp() * ref_lp).sum(-1)
    assert torch.allclose(logp, ref, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-5)
    g2 = torch.autograd.grad((ref * w).sum() + ref_ent.sum(), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 rounding; a misplaced chunk is off by O(1)


# ---- config and data order ---------------------------------------------------------------------------

def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlimit = 3000  # comment\nlr = 1\nwandb = True\n")
    cfg = load_config(str(f), ["--lr=2e-6", "--tensorboard=1", "--wandb=false", "--system_prompt=a=b {L}"], train.Config)
    assert (cfg.limit, cfg.lr, cfg.tensorboard, cfg.wandb) == (3000, 2e-6, True, False)
    assert isinstance(cfg.lr, float) and cfg.system_prompt == "a=b {L}"  # split on the first '='


def test_stage_configs_build_on_stage1_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/stage2.py and stage3.py exec stage1.py beside them, not from the cwd
    s1, s2, s3 = (load_config(str(ROOT / "configs" / f"stage{i}.py"), [], train.Config) for i in (1, 2, 3))
    assert (s1.limit, s2.limit, s3.limit) == (4000, 3000, 2000)
    assert s2.model == f"{s1.out_dir}/step_{s1.steps:06d}" and s2.lr == s1.lr and s3.out_dir == "runs/stage3"


@pytest.mark.parametrize("text, overrides, message", [
    ("limt = 3\n", [], "unknown config key 'limt'"),
    ("limit = '3'\n", [], "limit = '3' should be of type int"),
    ("kl_coef = True\n", [], "kl_coef = True should be of type float"),
    ("", ["--steps=ten"], "--steps=ten: expected int"),
    ("", ["--wandb=yes"], "--wandb=yes: expected true/false/1/0"),
    ("", ["--nope=1"], "--nope: unknown config key"),
    ("", ["steps=1"], "overrides are --key=value"),
    ("rollout_batch = 2.5\n", [], "rollout_batch = 2.5 should be of type int | str"),
    ("", ["--rollout_batch=sixty"], "rollout_batch='sixty': an int >= 1, or 'auto'"),
    ("", ["--rollout_batch=0"], "rollout_batch=0: an int >= 1, or 'auto'"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    f = tmp_path / "c.py"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(str(f), overrides, train.Config)
    assert message in str(e.value)
    if text:
        assert str(f) in str(e.value)


def test_rollout_batch_is_an_int_or_auto_from_a_file_or_the_command_line(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("rollout_batch = 'auto'\n")
    assert load_config(str(f), [], train.Config).rollout_batch == "auto"
    assert load_config(str(f), ["--rollout_batch=64"], train.Config).rollout_batch == 64
    assert load_config(None, ["--rollout_batch=auto"], train.Config).rollout_batch == "auto"


def test_data_order_is_a_seeded_permutation_per_epoch():
    steps = [batch_indices(10, 4, seed=3, start=4 * s) for s in range(5)]  # 20 = two epochs
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation per epoch
    assert batch_indices(10, 4, seed=3, start=12) == steps[3]  # a pure function of (seed, position)


# ---- runs --------------------------------------------------------------------------------------------

def test_short_run_raises_the_reward_and_writes_what_users_see(tiny, tmp_path):
    """12 steps on the tiny model: the cutoff reward must rise (the model learns to stop within L).
    Also checks the metrics lines, samples file, HF checkpoints (keep_last) and their trainer state."""
    cfg = tiny_cfg(tiny, tmp_path / "run", "--steps=12", "--save_every=4", "--sample_every=3")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend with each other on a shared machine
    try:
        out = Path(train.main(cfg, reward_fn=finish_reward))
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 13))
    for key in ("reward", "accuracy", "mean_len", "p90_len", "truncation_rate", "entropy", "kl", "grad_norm",
                "zero_var_groups", "tokens_per_s", "rollout_s", "update_s", "lr", "limit"):
        assert key in lines[0]
    first, last = [m["reward"] for m in lines[:3]], [m["reward"] for m in lines[-3:]]
    assert sum(last) / 3 > sum(first) / 3 + 0.15, (first, last)
    assert lines[-1]["truncation_rate"] < lines[0]["truncation_rate"]
    assert (out / "samples.txt").read_text().count("=== step") == 4 * cfg.num_samples
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000008", "step_000012"]  # keep_last=2
    from transformers import AutoTokenizer
    from model import Transformer
    ckpt = out / "step_000012"
    Transformer.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 12 and state["config"]["limit"] == cfg.limit
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]


def test_non_finite_loss_skips_the_optimizer_step(tiny, tmp_path):
    """A NaN reward makes the loss NaN: the step is logged as skipped and the weights do not move."""
    cfg = tiny_cfg(tiny, tmp_path / "nan", "--steps=1", "--kl_coef=0")
    out = Path(train.main(cfg, reward_fn=lambda text, gold, finished: float("nan")))
    assert json.loads((out / "metrics.jsonl").read_text())["skipped"] == 1
    before, after = _params(tiny[0]), _params(out / "step_000001")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rollout_batch_auto_takes_all_of_a_ranks_rows_on_the_cpu_and_says_so(tiny, tmp_path, capsys):
    """On the CPU "auto" is every row of the rank's step (4 prompts x 8 samples), printed at start and saved
    resolved in the checkpoint; a step trains with it."""
    cfg = tiny_cfg(tiny, tmp_path / "auto", "--steps=1", "--rollout_batch=auto")
    assert train.rollout_slots(cfg, Dist(0, 1, torch.device("cpu")))[0] == 32
    assert train.rollout_slots(cfg, Dist(0, 2, torch.device("cpu")))[0] == 16
    out = Path(train.main(cfg, reward_fn=finish_reward))
    said = "rollout_batch=auto: 32 KV-cache slots per generate call, all 32 rows of a rank (CPU)"
    assert said in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text())["step"] == 1
    assert torch.load(out / "step_000001" / "trainer_state.pt", weights_only=False)["config"]["rollout_batch"] == 32


def _params(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def _run(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_run.py"), *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tiny, tmp_path):
    """torchrun with 2 CPU ranks (gloo, FSDP2) ends 2 steps with the same parameters, losses and gradient
    norms as one process (each prompt's sampling is seeded by its place in the step's batch, so the
    rollouts do not depend on how prompts are split over ranks). Also: rollouts on ranks that stop at
    different lengths do not deadlock (rank 1 decodes more tokens than rank 0 through the FSDP model)."""
    model, data = tiny
    args = [TINY, f"--model={model}", f"--train_data={data}", "--steps=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*torchrun, str(ROOT / "tests" / "tiny_run.py"), *args, f"--out_dir={tmp_path / 'two'}"],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([*args[:-1], "--steps=3", f"--out_dir={tmp_path / 'one'}"])  # checkpoints at steps 2 and 3
    assert one.returncode == 0, one.stderr[-3000:]
    p1, p2 = _params(tmp_path / "one" / "step_000002"), _params(tmp_path / "two" / "step_000002")
    p0 = _params(model)
    for k in p1:
        assert (p1[k] - p0[k]).abs().max() > 1e-4 or k.endswith("bias"), f"{k} did not train"
        torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=1e-4)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward"] for m in m1[:2]] == [m["reward"] for m in m2]
    # AdamW and clipping hide a wrong gradient scale in the parameters; the loss and norm show it
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # resume at 2 ranks: rank 0 alone reads optimizer.pt and broadcasts it into the shards; step 3 then
    # lands where the one-process run's step 3 did (a lost or zeroed Adam state would not)
    more = subprocess.run([*torchrun, str(ROOT / "tests" / "tiny_run.py"), *args[:-1], "--steps=3",
                           f"--out_dir={tmp_path / 'two'}"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout
    p1, p2 = _params(tmp_path / "one" / "step_000003"), _params(tmp_path / "two" / "step_000003")
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=1e-4)

    check = subprocess.run([*torchrun, str(ROOT / "tests" / "tiny_run.py"), "--unshard-check", str(Path(model).parent)],
                           env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "rank 0 decoded 3 tokens" in check.stdout and "rank 1 decoded 9 tokens" in check.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--dynamic_sampling=true", "--limit=5", "--max_sample_rounds=3"]],
                         ids=["plain", "dynamic_sampling"])
def test_resume_after_sigkill_continues_where_it_stopped(tiny, tmp_path, extra):
    """Kill a run with SIGKILL after step 3's metrics line (so metrics.jsonl runs ahead of the step-2
    checkpoint), add a line torn mid-write, rerun the same command: it resumes from the newest complete
    checkpoint, metrics.jsonl has each step once, steps, rewards (so the data order and rollouts) and
    final parameters equal those of an uninterrupted run, and with keep_last=1 (the resumed checkpoint
    is deleted) the new checkpoints still carry the tokenizer files. With dynamic sampling (at limit 5 most
    groups are all cut off, so steps draw more rounds) the resumed run draws the same extra prompts."""
    model, data = tiny
    args = [TINY, f"--model={model}", f"--train_data={data}", "--steps=8", "--save_every=2", "--keep_last=1", *extra]
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "tests" / "tiny_run.py"), *args, f"--out_dir={killed}"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    metrics = killed / "metrics.jsonl"
    while not ((killed / "step_000002" / "trainer_state.pt").exists() and metrics.exists()
               and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = checkpoint.latest(killed)
    step_saved = int(saved.name.split("_")[1])
    assert step_saved < 8, "killed too late to test a resume"
    lines_before = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write('{"step": 9, "rew')  # a kill in the middle of a write

    again = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {saved} (step {step_saved})" in again.stdout
    straight = _run([*args, f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    resumed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 9)), f"{lines_before} lines before the resume"
    for a, b in zip(resumed, ref):
        assert (a["reward"], a["mean_len"], a["groups_drawn"]) == (b["reward"], b["mean_len"], b["groups_drawn"]), a["step"]
    if extra:
        assert max(m["sample_rounds"] for m in ref) > 1, "no step drew a second round: the test tests nothing"
    assert lines_before > step_saved  # there were lines past the checkpoint to drop
    assert (killed / "step_000008" / "tokenizer.json").is_file() and not (killed / "step_000002").exists()
    p_resumed, p_ref = _params(killed / "step_000008"), _params(tmp_path / "straight" / "step_000008")
    for k in p_ref:
        torch.testing.assert_close(p_resumed[k], p_ref[k], atol=1e-6, rtol=1e-5)
    shutil.rmtree(tmp_path, ignore_errors=True)
