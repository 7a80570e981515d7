"""
Training checkpoints: written whole or not at all, found again on resume.

    checkpoint.save(model, opt, state, d, out_dir / "step_000020", keep_last=3)
    path = checkpoint.latest(out_dir)                     # the newest complete one, or None
    state = checkpoint.load(model, opt, path, d)          # restores the optimizer; returns trainer_state

A checkpoint `{out_dir}/step_{step:06d}/` is a Hugging Face dir (model.py's format: config.json,
model.safetensors, tokenizer files; transformers and vLLM load it) plus `optimizer.pt` and
`trainer_state.pt` (step, config, RNG states, data position). Weights are the fp32 master weights, so a
resume is exact. Choices:
- Every rank takes part in gathering the full model and optimizer state dicts (collectives); rank 0
  writes everything under `.tmp_step_...` and renames it. trainer_state.pt is written last, so a dir
  without it is never trusted.
- On resume rank 0 alone reads optimizer.pt (2x the fp32 weights: 61 GB at 7B) and broadcasts it into
  the shards, rather than every rank holding a copy in host memory. The format does not depend on the
  world size.
"""

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def complete(out_dir) -> list[Path]:
    """The checkpoints of out_dir that were written to the end, oldest first."""
    return sorted(p for p in Path(out_dir).glob("step_*") if (p / "trainer_state.pt").is_file())


def latest(out_dir) -> Path | None:
    done = complete(out_dir)
    return done[-1] if done else None


def save(model, opt, state: dict, d, path: Path, keep_last: int):
    """Write `path` (a `step_*` dir) atomically; then keep the newest `keep_last` (0: all)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=full)  # collectives: every rank takes part
    osd = get_optimizer_state_dict(model, opt, options=full)
    if d.rank == 0:
        path = Path(path)
        tmp = path.with_name(".tmp_" + path.name)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        torch.save(osd, tmp / "optimizer.pt")
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in complete(path.parent)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()


def load(model, opt, path: Path, d) -> dict:
    """Restore the optimizer state of checkpoint `path` into `opt` (the model was loaded from it) and
    return its trainer_state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    osd = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True) if d.rank == 0 else {}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=d.world > 1,
                                                                         broadcast_from_rank0=d.world > 1))
    return state


def clean(out_dir):
    """Remove what a kill during a save left behind."""
    for tmp in Path(out_dir).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
