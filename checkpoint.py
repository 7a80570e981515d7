"""
Training checkpoints: written whole or not at all, found again on resume.

    checkpoint.save(model, opt, state, d, out_dir / "step_000020", keep_last=3)
    path = checkpoint.latest(out_dir)                     # the newest complete, readable one, or None
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
- A checkpoint is `verify`d before it is used (resume, schedule's validation): a broken one (a disk
  fault, a hand edit, a copy cut short) is named with the reason and renamed `broken_step_...`, never
  deleted, and the previous one is used. A failed write (disk full, permissions) names the file and the
  OS's reason; the half-written dir is removed and the earlier checkpoints stay as they were.
- `lock(out_dir)`: one run per out_dir. An flock on `out_dir/.lock`, which the OS drops when its process
  dies, so the lock of a killed run is free for the next one without any pid test.
"""

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import distributed
from model import _weight_files, check_dir


def _written(out_dir) -> list[Path]:
    """The checkpoint dirs of out_dir that a save finished (trainer_state.pt is written last), oldest first."""
    return sorted(p for p in Path(out_dir).glob("step_*") if (p / "trainer_state.pt").is_file())


def verify(path):
    """Raise ValueError naming the file and the reason unless checkpoint `path` is whole: config.json,
    the weights, trainer_state.pt and optimizer.pt present and readable, every file the size it had when
    saved (save records the sizes in trainer_state.pt). Reads headers, not tensors: safetensors' header
    must cover its file; trainer_state.pt is loaded (it is small). optimizer.pt is 2x the fp32 weights (61
    GB at 7B), so it is not read: its size is compared with the recorded one, and torch.load(mmap=True)
    reads its zip directory and pickle, not its tensors. A cut-short file fails both; a flipped bit
    inside tensor data passes (catching that would need a checksum, a full read of 61 GB per resume)."""
    path = Path(path)
    try:
        check_dir(path, tokenizer=False)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    f = path / "trainer_state.pt"
    try:
        sizes = torch.load(f, map_location="cpu", weights_only=False).get("file_sizes", {})
        for name, size in sizes.items():
            f = path / name
            if f.stat().st_size != size:
                raise ValueError(f"{f.stat().st_size} bytes, {size} when it was saved")
        f = path / "config.json"
        json.loads(f.read_text())
        f = path
        for f in _weight_files(path):
            with safe_open(str(f), framework="pt"):
                pass
        f = path / "optimizer.pt"
        torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # whatever stops a read (zip, pickle, JSON, safetensors, OS errors) breaks the checkpoint
        raise ValueError(f"{f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _usable(p: Path) -> bool:
    """Whether checkpoint p passes `verify`; a broken one is named and (rank 0) renamed broken_step_..."""
    try:
        verify(p)
        return True
    except ValueError as e:
        if distributed.rank() == 0:
            aside, n = p.with_name("broken_" + p.name), 1
            while aside.exists():
                n += 1
                aside = p.with_name(f"broken{n}_{p.name}")
            os.replace(p, aside)
            print(f"checkpoint {p} is broken ({e}); moved it aside to {aside.name}, not used", flush=True)
        return False


def complete(out_dir) -> list[Path]:
    """The checkpoints of out_dir that were written to the end and pass `verify`, oldest first; broken
    ones are moved aside."""
    return [p for p in _written(out_dir) if _usable(p)]


def latest(out_dir) -> Path | None:
    """The newest checkpoint that passes `verify`; broken ones newer than it are moved aside."""
    return next((p for p in reversed(_written(out_dir)) if _usable(p)), None)


def save(model, opt, state: dict, d, path: Path, keep_last: int):
    """Write `path` (a `step_*` dir) atomically; then keep the newest `keep_last` (0: all). A failed write
    raises OSError naming the file and the OS's reason, after removing the temporary dir."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=full)  # collectives: every rank takes part
    osd = get_optimizer_state_dict(model, opt, options=full)
    if d.rank == 0:
        path = Path(path)
        tmp = path.with_name(".tmp_" + path.name)
        shutil.rmtree(tmp, ignore_errors=True)
        where = tmp
        try:
            model.save_pretrained(tmp, state_dict=sd)
            # torch.save into a Python file: a failed write leaves its OSError in the chain (saving to a
            # path, torch says only "basic_ios::clear: iostream error")
            where = tmp / "optimizer.pt"
            with open(where, "wb") as f:
                torch.save(osd, f)
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}  # for verify
            where = tmp / "trainer_state.pt"
            with open(where, "wb") as f:
                torch.save({**state, "file_sizes": sizes}, f)
            where = path
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except (OSError, RuntimeError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            raise OSError(f"could not write {where}: {cause or e}; the earlier checkpoints are intact") from e
        for old in _written(path.parent)[:-keep_last] if keep_last > 0 else []:
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


@contextmanager
def lock(out_dir):
    """Hold out_dir for this run: a second run on it fails, naming the pid of the first. The flock goes with
    the process that holds it (end, exception, kill -9); the pid in the file is only for the message."""
    path = Path(out_dir) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"{out_dir} is in use by another run (pid {holder}, lock file {path}); wait for it "
                           f"to end or give another out_dir") from None
    try:
        f.seek(0)
        old = f.read().strip()
        if old:  # left by a run that was killed: its flock went with it
            print(f"{path}: taking over the lock of pid {old}, an earlier run that is gone", flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield path
    finally:
        f.truncate(0)  # a normal end leaves no pid behind
        f.close()
