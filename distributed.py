"""
Who am I, on which device, and the process group, for every entry point.

    d = distributed.init(cfg.device)   # reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK; a group when WORLD_SIZE > 1
    ...                                # d.rank, d.world, d.device, d.all_sum(x), d.gather(x)
    distributed.cleanup()              # in the entry point that called init, at its very end

Choices: the entry point (`python train.py`, `schedule.py`, `eval.py`) makes the group and tears it
down; library functions (`train.main`, `eval.evaluate`) use whatever group exists and never destroy
it, so a schedule runs all its stages and validations in one group. nccl on CUDA, with a 3-hour
collective timeout: ranks whose rollouts or evaluation samples differ in length reach a collective at
very different times, and NCCL's 10-minute default would kill them. gloo on the CPU keeps its default.
"""

import gc
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def all_max(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors from all ranks in rank order."""
        if self.world == 1:
            return x
        x = x.to(self.device)
        out = torch.empty((self.world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=self.device)
        dist.all_gather_single(out, x)
        return out.cpu()


def device(name: str = "") -> torch.device:
    """The device named ("" = CUDA when there is one, else the CPU); on CUDA this process's LOCAL_RANK GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but torch sees no CUDA device (torch {torch.__version__})")
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def init(device_name: str = "") -> Dist:
    """This process's rank, world size and device; makes the process group under torchrun if none exists."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    # before CUDA's allocator starts: a run alternates a large KV cache with update activations, and
    # expandable segments let freed blocks serve other sizes instead of fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dev = device(device_name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", timeout=timedelta(hours=3))
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, dev)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def free_memory():
    """Between phases (rollout -> update, stage -> validation): FSDP2 modules hold reference cycles, so a
    deleted model's memory waits for the cyclic GC; collect it and hand cached CUDA blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cleanup():
    """All ranks together (a barrier), then destroy the group. Then a short pause without the GIL, for
    gloo: its worker thread releases a finished collective's Python state only once it holds the GIL,
    and if that happens during interpreter shutdown the process aborts ("terminate called without an
    active exception"); FSDP keeps the group's threads alive past destroy."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.1)  # sleeping releases the GIL
