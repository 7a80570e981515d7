"""Careless input and broken files (issue 18): each probe of a hostile or careless user, with the clear
error it now gets (naming the key, the file or the run in the way) or the right behaviour.

Bad values must fail before any model loads: the runs below point --model at a directory that does not
exist, so a check that came too late would show up as that error instead. The runs use tests/tiny_run.py's
random 2-layer model and configs/tiny.py."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import eval as ev
import schedule
import train
from config import load_config
from test_train import ENV, ROOT, TINY, tiny_cfg
from tiny_run import finish_reward, make_tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads would only contend with each other on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run4(tiny, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (keep_last=0), samples every 2 steps."""
    out = tmp_path_factory.mktemp("run4") / "run"
    train.main(tiny_cfg(tiny, out, "--steps=4", "--keep_last=0"), reward_fn=finish_reward)
    return out


# ---- values: every probe fails naming its key, before a model loads ----------------------------------------

@pytest.mark.parametrize("override", [
    "--samples_per_prompt=1",  # was: zero-variance groups, nothing learned, the base model saved
    "--lr=inf", "--lr=nan",  # was: NaN weights saved
    "--rollout_batch=0", "--minibatches=0", "--ppo_epochs=0",  # was: empty rollouts, no optimizer step
    "--limit=0", "--limit=-3", "--prompts_per_step=0",  # was: a message from rollout.generate, after loading
    "--micro_batch_size=0", "--logprob_chunk=0",  # was: "range() arg 3 must not be zero"
])
def test_bad_train_value_is_named_before_a_model_loads(tmp_path, override):
    key, text = override[2:].split("=")
    args = [f"--model={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=f"^{key}="):
        load_config(TINY, args + [override], train.Config)
    # train.main checks too (a Config built in code): the value, not the missing model, is the error
    cfg = load_config(TINY, args, train.Config)
    with pytest.raises(ValueError, match=f"^{key}="):
        train.main(dataclasses.replace(cfg, **{key: type(getattr(cfg, key))(text)}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", [
    "--samples=0",  # was: read as "not set", 16 samples run and reported
    "--max_batch=0",  # was: 0% reported from empty records
    "--budget=-1", "--max_new_tokens=0",  # was: a message from rollout.generate, after loading
])
def test_bad_eval_value_is_named_before_a_model_loads(tmp_path, override):
    key = override[2:].split("=")[0]
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "problem": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=f"^{key}="):
        ev.main([f"--ckpt={tmp_path / 'missing'}", f"--data={data}", f"--out={tmp_path / 'out'}", override])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_named(tmp_path):
    """Was: an AttributeError from torch internals."""
    cfg = load_config(TINY, [f"--model={tmp_path / 'missing'}", "--device=cuda"], train.Config)
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        train.main(cfg)


def test_bad_stage_key_is_named_as_the_stage_not_the_file(tmp_path):
    f = tmp_path / "s.py"
    f.write_text("stages = [dict(limit=16, steps=4)]\n")
    with pytest.raises(ValueError) as e:
        load_config(str(f), ['--stages=[{"limit": 16, "steps": 4, "lmit": 3}]'], schedule.ScheduleConfig)
    assert "stages[0].lmit" in str(e.value) and str(f) not in str(e.value)


def test_refused_schedule_names_the_key_that_differs(tmp_path):
    """Was: both settings dicts printed in full."""
    stage = {"limit": 16, "steps": 4, "lr": 0.001, "seed": 0}
    cfg = load_config(None, [f"--stages={json.dumps([stage])}", f"--out_dir={tmp_path}"], schedule.ScheduleConfig)
    state = schedule.load_state(cfg, tmp_path)
    state["stages"] = [{"overrides": {**stage, "lr": 0.002}}]
    (tmp_path / "schedule.json").write_text(json.dumps(state))
    with pytest.raises(ValueError) as e:
        schedule.load_state(cfg, tmp_path)
    msg = str(e.value)
    assert "stage 1" in msg and "lr=0.002, now 0.001" in msg and "limit" not in msg and "seed" not in msg


# ---- model directories --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing", "no such model directory"),  # was: "Repo id must be in the form ..."
    ("empty", "missing config.json, model.safetensors or model.safetensors.index.json, tokenizer_config.json"),
    ("no tokenizer", "missing tokenizer_config.json, tokenizer.json or vocab.json or tokenizer.model"),
])
def test_model_dir_lacking_files_is_named(tiny, tmp_path, case, message):
    d = tmp_path / "model"
    if case != "missing":
        d.mkdir()
    if case == "no tokenizer":
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(tiny[0]) / name, d / name)
    with pytest.raises(FileNotFoundError) as e:
        train.main(tiny_cfg((d, tiny[1]), tmp_path / "out"))
    assert str(d) in str(e.value) and message in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        ev.load_model(str(d), "cpu")
    assert str(d) in str(e.value) and message in str(e.value)


# ---- the run -------------------------------------------------------------------------------------------------

def test_non_finite_weights_stop_the_run_before_a_save(tiny, tmp_path, monkeypatch):
    """Was (--lr=inf): a checkpoint full of NaN saved, exit 0. The config check now refuses lr=inf (above);
    with the check switched off, the first optimizer step makes the weights NaN and the run stops,
    naming the step and a parameter, before the step is saved."""
    cfg = tiny_cfg(tiny, tmp_path / "out", "--steps=2", "--save_every=1")
    monkeypatch.setattr(train.Config, "check", lambda self: None)
    cfg.lr = float("inf")
    with pytest.raises(FloatingPointError, match=r"step 1: .*non-finite, e\.g\. '.+'"):
        train.main(cfg, reward_fn=finish_reward)
    assert not list((tmp_path / "out").glob("*step_*"))


def test_second_run_on_an_out_dir_is_refused_and_a_dead_runs_lock_taken_over(tiny, tmp_path, capsys):
    """Was: two runs on one out_dir, one rewriting the other's metrics. The first run here is a forked
    process holding the lock; once it is killed (-9), its lock is taken over."""
    out = tmp_path / "out"
    out.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, says so, waits to be killed
        try:
            with checkpoint.lock(out):
                os.write(w, b"held")
                time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 4) == b"held"
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {pid}, lock file {out / '.lock'}"):
            train.main(tiny_cfg(tiny, out))
        assert not (out / "metrics.jsonl").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r), os.close(w)
    capsys.readouterr()
    with checkpoint.lock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    assert f"taking over the lock of pid {pid}, an earlier run that is gone" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""  # released


def test_resume_cuts_samples_back_to_the_checkpoint(tmp_path):
    """Was: samples.txt kept the blocks of the steps redone after a resume, so they appeared twice."""
    (tmp_path / "samples.txt").write_text("".join(f"=== step {s} | row {r} | reward 0.00\nprompt\n=== text\n"
                                                  for s in (2, 4, 6) for r in (0, 1)) + "=== step 8 | row 0 | rew")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    train._log_metrics_open(tmp_path, 4).close()
    text = (tmp_path / "samples.txt").read_text()
    assert [ln.split(" |")[0] for ln in text.splitlines() if ln.startswith("=== step")] == ["=== step 2"] * 2 + ["=== step 4"] * 2
    assert text.count("=== text\n") == 4  # a completion's own lines stay with its block
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---- checkpoints -----------------------------------------------------------------------------------------------

def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "optimizer.pt", "config.json",
                                  "optimizer.pt, no sizes"])
def test_broken_newest_checkpoint_is_named_moved_aside_and_the_previous_used(run4, tmp_path, capsys, name):
    """Was: a deserialisation error with no path, on every rerun, until the user deleted the dir by hand.
    "no sizes": a checkpoint without the recorded file sizes, where optimizer.pt's own structure tells."""
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    newest = out / "step_000004"
    if name.endswith("no sizes"):
        name = name.split(",")[0]
        state = torch.load(newest / "trainer_state.pt", weights_only=False)
        del state["file_sizes"]
        torch.save(state, newest / "trainer_state.pt")
    _truncate(newest / name)
    assert checkpoint.latest(out) == out / "step_000002"
    msg = capsys.readouterr().out
    assert f"checkpoint {newest} is broken ({newest / name}: " in msg and "broken_step_000004" in msg
    assert (out / "broken_step_000004" / name).is_file() and not newest.exists()  # kept, not deleted
    assert checkpoint.complete(out) == [out / "step_000002"]  # schedule validates none of the broken ones


def test_resume_steps_over_a_corrupted_newest_checkpoint(tiny, run4, tmp_path, capsys):
    """A run that ended (or was killed: its lock file still names it) at step 4, whose step-4 optimizer.pt
    is then cut short. The rerun names it, moves it aside, resumes from step 2 and redoes steps 3 and 4
    exactly as before; metrics and samples hold each step once."""
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    _truncate(out / "step_000004" / "optimizer.pt")
    (out / ".lock").write_text("999999\n")  # a killed run's pid
    train.main(tiny_cfg(tiny, out, "--steps=6", "--keep_last=0"), reward_fn=finish_reward)
    stdout = capsys.readouterr().out
    assert f"checkpoint {out / 'step_000004'} is broken ({out / 'step_000004' / 'optimizer.pt'}: " in stdout
    assert f"resuming from {out / 'step_000002'} (step 2)" in stdout and "taking over the lock of pid 999999" in stdout
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    before = [json.loads(x) for x in (run4 / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics[:4], before):
        assert (a["reward"], a["mean_len"], a["loss"]) == (b["reward"], b["mean_len"], b["loss"]), a["step"]
    again, first = load_file(out / "step_000004" / "model.safetensors"), load_file(run4 / "step_000004" / "model.safetensors")
    assert all(torch.equal(again[k], first[k]) for k in first)
    samples = (out / "samples.txt").read_text()
    assert [int(ln.split()[2]) for ln in samples.splitlines() if ln.startswith("=== step")] == [2, 2, 4, 4, 6, 6]
    assert sorted(p.name for p in out.glob("*step_*")) == ["broken_step_000004", "step_000002", "step_000004",
                                                           "step_000006"]


DISK_FULL = """
import resource, sys, torch
import checkpoint
from distributed import Dist
from model import Transformer
out = sys.argv[1]
model = Transformer.from_pretrained(sys.argv[2])
opt = torch.optim.AdamW(model.parameters())
model(torch.tensor([[1, 2, 3]])).sum().backward()
opt.step()
d, state = Dist(0, 1, torch.device("cpu")), {"step": 1}
checkpoint.save(model, opt, state, d, f"{out}/step_000001", keep_last=0)
# files up to just over model.safetensors' size: the weights fit, optimizer.pt (2x the weights) does not
limit = (checkpoint.Path(out) / "step_000001" / "model.safetensors").stat().st_size + 4096
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    checkpoint.save(model, opt, {"step": 2}, d, f"{out}/step_000002", keep_last=0)
except OSError as e:
    print(e)
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE: Linux only")
def test_failed_save_names_the_file_and_the_cause_and_keeps_the_previous_checkpoint(tiny, tmp_path):
    """Was: "basic_ios::clear: iostream error" while writing optimizer.pt, then "unexpected pos" on the
    rerun. A size limit on files (RLIMIT_FSIZE, in a subprocess) stands in for a full disk: the write
    fails with EFBIG where a full disk gives ENOSPC, through the same path."""
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path), tiny[0]], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"could not write {tmp_path / '.tmp_step_000002' / 'optimizer.pt'}: [Errno 27] File too large; "
            "the earlier checkpoints are intact") in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # the half-written dir is gone
    checkpoint.verify(tmp_path / "step_000001")


# ---- eval outputs ----------------------------------------------------------------------------------------------

def test_failed_eval_rerun_keeps_the_earlier_outputs(tiny, tmp_path):
    """Was: a rerun into an existing --out truncated records.jsonl before the checkpoint loaded."""
    model, data = tiny
    out = tmp_path / "out"
    args = [f"--data={data}", f"--out={out}", "--samples=2", "--max_new_tokens=4", "--n_problems=2"]
    ev.main([f"--ckpt={model}", *args])
    before = {f: (out / f).read_bytes() for f in ("records.jsonl", "eval.json", "eval.md")}
    assert len(before["records.jsonl"].splitlines()) == 4
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        ev.main([f"--ckpt={tmp_path / 'missing'}", *args])
    assert {f: (out / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == sorted(before)  # no temporary files left


def test_schedule_and_eval_refuse_an_out_dir_in_use(tmp_path):
    """The schedule and eval.py hold their out_dir's lock too: with it held, each refuses to start."""
    data = tmp_path / "p.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    with checkpoint.lock(tmp_path):
        with pytest.raises(RuntimeError, match="in use by another run"):
            schedule.run_schedule(schedule.ScheduleConfig(out_dir=str(tmp_path), model=str(tmp_path / "none")))
        with pytest.raises(RuntimeError, match="in use by another run"):
            ev.main([f"--ckpt={tmp_path / 'none'}", f"--data={data}", f"--out={tmp_path}"])
