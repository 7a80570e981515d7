"""bench/gpu.py on the CPU: every check's code runs on a tiny random model (--cpu-smoke's sizes) and passes
where it has a criterion; a machine without CUDA gets one line and exit 0; a check past its timeout is cut
off and reported, not waited for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # after the root: bench/rollout.py must not shadow rollout.py
import gpu  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check_model")
    gpu.build(str(path), gpu.SMOKE)
    return str(path)


@pytest.mark.parametrize("name", list(gpu.CHECKS))
def test_every_check_runs_on_a_tiny_cpu_model(name, ckpt):
    out = gpu.CHECKS[name][0](ckpt, gpu.SMOKE)
    json.dumps(out)  # one JSON line
    assert out.get("ok", True), out
    if name in ("parity", "greedy"):  # fp32 on both sides: transformers and we agree exactly
        assert out["top1_agree" if name == "parity" else "rows_identical"] == 1.0
    if name == "logprobs":  # the sampler's log-probs are the full softmax's: no token would be clipped
        assert out["p99_abs_diff"] < 1e-5 and out["clip_fraction_at_0.2"] == 0.0
    if name == "speed":
        assert [w["width"] for w in out["widths"]] == list(gpu.SMOKE.widths) and out["bandwidth_GBs"] > 0
        assert all(w["eager_tok_s"] > 0 and "graphed_tok_s" not in w for w in out["widths"])  # no graphs off CUDA
    if name in ("graphs", "flash_decode"):  # off CUDA both sides run the same eager SDPA step
        assert not out["graphed" if name == "graphs" else "flash_decode"]
    if name == "update":
        assert out["weights_moved"] and out["tokens_per_row"] == gpu.SMOKE.prompt_tokens + gpu.SMOKE.limit


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_one_line_says_so_and_exits_0():
    run = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 1
    assert "no CUDA device" in json.loads(lines[0])["skipped"]


def test_a_check_past_its_timeout_is_cut_off_and_reported(ckpt):
    out = gpu.run("env", ckpt, smoke=True, timeout=0.01)  # python cannot even import torch in 10 ms
    assert out == {"check": "env", "ok": False, "error": "timed out after 0.01 s"}
