"""The multi-node launch recipe of the README, as tested on one machine: two torchrun "nodes" of one CPU
process each meet through the c10d rendezvous (the flags the SLURM script passes) and train together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import make_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_nodes_meet_through_the_c10d_rendezvous(tmp_path):
    model, data = make_tiny(tmp_path)
    with socket.socket() as s:  # a free port for the rendezvous endpoint
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv-id=launch-test", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              str(ROOT / "tests" / "tiny_run.py"), str(ROOT / "configs" / "tiny.py"), f"--model={model}",
              f"--train_data={data}", f"--out_dir={out}", "--steps=2", "--save_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(launch, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs[0][-2000:] + logs[1][-2000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "rollout_len_rank0.txt").is_file() and (out / "rollout_len_rank1.txt").is_file()  # world size 2
