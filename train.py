"""
ThinkPrune training: GRPO under a hard token limit L, on one process or many (torchrun + FSDP2).

    python train.py configs/tiny.py --steps=20                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py configs/stage1.py      # FSDP2 over 8 GPUs
    python train.py configs/stage1.py --limit=3000 --lr=2e-6    # --key=value overrides the config file

A completion that has not emitted EOS within its first L generated tokens gets reward 0 whatever it
says; a finished one gets 1 if its \\boxed{} answer is right (reward.score). That is the whole method:
the policy learns that thinking past L is worth nothing, and learns to stop.

One step, in the order `train_step` runs it:
1. Data: a seeded permutation of the problems per epoch; step s takes the next `prompts_per_step`
   problems of that order, and rank r the r-th slice of them. The order is a pure function of
   (seed, step), so a resumed run sees exactly the problems the killed one would have.
2. Rollout: `rollout.generate` on the *unsharded* model, n = samples_per_prompt, max_new_tokens = L,
   each prompt's samples seeded by (seed, step, its place in the step's batch): the rollouts do not
   depend on how many ranks share the batch.
   Every FSDP module is unsharded once and told not to reshard after forward, so decoding runs no
   collectives at all: ranks whose rows stop at different lengths never wait for each other (a
   sharded forward all-gathers per call and deadlocks as soon as one rank runs more decode steps).
3. Reward: reward.score(text, gold, finished); unfinished -> 0.
4. Advantage per group of G samples: (r - mean) / (std + eps) (unbiased std, as veRL;
   `std_normalize=False` gives plain r - mean, as Dr. GRPO argues). Groups whose rewards are all equal
   carry no policy-gradient signal: they are counted and, with `skip_zero_var_groups`, left out of the
   update (their KL/entropy terms go with them).
5. Update: `grpo_loss` (its docstring names every choice), micro-batches of `micro_batch_size`
   sequences with gradient accumulation, `minibatches` optimizer steps per epoch and `ppo_epochs`
   epochs per rollout batch (the paper: 1 and 1), AdamW, linear warmup then constant lr, grad clipping.
   A non-finite loss or grad norm skips the optimizer step (logged as `skipped`).
6. Metrics (JSONL + tqdm), decoded samples every `sample_every` steps, a checkpoint every `save_every`.

Distributed: torchrun sets WORLD_SIZE; only then is a process group made (nccl on GPU, gloo on CPU)
and the model wrapped with FSDP2 (`fully_shard` per block, then the root; bf16 params and fp32
gradient reduction on GPU). The loss is a sum over completion tokens divided by the *global* number
of completion tokens, times world_size because FSDP averages gradients over ranks. Every rank runs
the same number of micro-batches (ranks short of rows run zero-weight dummy rows), so the collectives
of forward and backward always pair up. Reward and length metrics are gathered from all ranks.
One process on a GPU runs in fp32 (TF32 matmuls): bf16 autocast would make the rollout's KV cache and
the trained forward disagree in dtype; real runs use torchrun, where FSDP's policy gives bf16. fp32
doubles the memory: the stage configs' 256 rollout rows at L=4000 are a ~63 GB KV cache at 1.5B, so
one GPU needs a smaller `rollout_batch`.

Checkpoints: `{out_dir}/step_{step:06d}/` is an HF checkpoint dir (model.py's format: config.json,
model.safetensors, tokenizer files; loadable by transformers and vLLM) plus `trainer_state.pt` (step,
RNG states, config, data position) and `optimizer.pt`. Weights are the fp32 master weights, so a
resume is exact (1.5B: ~7 GB a checkpoint; `keep_last` bounds the disk). The optimizer state is
gathered to a full, name-keyed state dict and rank 0 writes everything under `.tmp_step_...`, then
renames it: a kill never leaves a half checkpoint that resume would trust. On resume rank 0 alone
reads optimizer.pt and broadcasts it into the shards. Rerunning the same command resumes from the
newest complete checkpoint in out_dir (tested at 1 and at 2 ranks; the format does not depend on the
world size). metrics.jsonl is cut back to the resumed step so no step appears twice.

Simplifications: the full model is loaded on every rank before sharding (fine at 1.5B; a 70B run
would want meta-device init + broadcast); every micro-batch's backward reduce-scatters (no
no_sync-style accumulation); rollouts use our own sampler, not vLLM.
"""

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import reward
from data import DATA_DIR, build_prompt, load_problems
from model import Transformer, device_and_dtype
from rollout import Rollout, generate


# ThinkPrune's official system prompt (its data-prep script), with the limit sentence it appends.
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think></think> and "
    "<answer></answer> tags, respectively, i.e., <think> reasoning process here</think><answer> answer "
    "here</answer>. The output of the assistant should be within {L} tokens.")


@dataclass
class Config:
    # model and data (paths relative to the current directory)
    model: str = "runs/toy/base"  # HF checkpoint dir to start from; the tokenizer is read from it too
    train_data: str = str(DATA_DIR / "train.jsonl")
    out_dir: str = "runs/train"
    system_prompt: str = SYSTEM_PROMPT  # "{L}" is replaced by `limit`
    max_prompt_tokens: int = 768  # longer prompts are dropped before training (counted, as veRL does)
    # the length limit
    limit: int = 4000  # L: max generated tokens; no EOS by then -> reward 0
    # rollout
    prompts_per_step: int = 128  # global, split over ranks
    samples_per_prompt: int = 16  # G, the group size
    # plain sampling at this temperature (no top-p/top-k): the update's log-probs are the full softmax
    # at the same temperature, so the importance ratio starts at 1 (a truncated distribution would not)
    temperature: float = 1.0
    rollout_batch: int = 256  # KV-cache slots per generate call
    # GRPO
    clip_eps: float = 0.2
    kl_coef: float = 0.001  # k3 KL to the starting model; 0 -> no reference model is loaded
    entropy_coef: float = 0.001
    std_normalize: bool = True
    adv_eps: float = 1e-6
    skip_zero_var_groups: bool = True
    minibatches: int = 1  # optimizer steps per epoch over one rollout batch
    ppo_epochs: int = 1
    # optimisation
    steps: int = 100  # total steps of the run (a resumed run continues up to this)
    lr: float = 1e-6
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    micro_batch_size: int = 4  # sequences per forward/backward
    activation_checkpointing: bool = False
    logprob_chunk: int = 2048  # positions per chunk of the fp32 log-softmax
    # checkpoints and logging
    save_every: int = 20
    keep_last: int = 3
    sample_every: int = 10
    num_samples: int = 2  # decoded completions written per sample_every steps
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "thinkprune"
    seed: int = 42
    device: str = ""  # "" = cuda when available, else cpu


# Collectives wait this long before the NCCL watchdog kills the job (its default is 10 minutes): ranks
# whose rollouts or evaluation samples differ in length reach a gather at very different times.
DIST_TIMEOUT = timedelta(hours=3)


def init_process_group(cuda: bool, **kw):
    """nccl with DIST_TIMEOUT on GPUs; gloo with its own 30-minute default on CPUs."""
    if cuda:
        dist.init_process_group("nccl", timeout=DIST_TIMEOUT, **kw)
    else:
        dist.init_process_group("gloo", **kw)


def destroy_process_group():
    """Every entry point's teardown: all ranks together (a barrier), then destroy. Then a pause without the
    GIL, for gloo: its worker thread drops each finished collective, whose captured thread-local state holds
    a Python object, only once it gets the GIL; if that is during interpreter shutdown, the thread cannot
    take it and the process aborts ("terminate called without an active exception"; FSDP keeps the group
    alive past destroy, so its threads live until exit). Measured on tests/tiny_run.py --unshard-check under
    torchrun: 7 aborts in 78 launches without the pause, 0 in 40 with it."""
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.1)  # sleeping releases the GIL


# ---- config ----------------------------------------------------------------------------------------

def _convert(key: str, value: str, typ):
    if typ in (list, dict):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--{key}={value}: expected a JSON {typ.__name__}") from None
        if not isinstance(value, typ):
            raise ValueError(f"--{key}={value}: expected a JSON {typ.__name__}")
        return value
    if typ is bool:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise ValueError(f"--{key}={value}: expected true/false/1/0")
    try:
        return typ(value)
    except ValueError:
        raise ValueError(f"--{key}={value}: expected {typ.__name__}") from None


def typed(where, key: str, value, typ):
    """`value` (from a config file) as a field of type `typ`: ints pass as floats, nothing else converts."""
    if not (isinstance(value, typ) or (typ is float and isinstance(value, int))) or \
            (typ is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}: {key} = {value!r} should be of type {typ.__name__}")
    return typ(value)


def load_config(path: str | None, overrides: list[str], cls=Config):
    """Defaults of the dataclass `cls` <- assignments in the file at `path` <- `--key=value` overrides
    (lists and dicts as JSON). schedule.py and demo.py read their configs with this too."""
    cfg, types = cls(), {f.name: f.type for f in fields(cls)}
    if path:
        ns: dict = {"__file__": str(path)}  # so that a config can exec another one beside it
        exec(compile(Path(path).read_text(), path, "exec"), ns)  # its own namespace, not our globals
        for key, value in ns.items():
            if key.startswith("__") or type(value).__name__ == "module":
                continue
            if key not in types:
                raise ValueError(f"{path}: unknown config key {key!r}")
            setattr(cfg, key, typed(path, key, value, types[key]))
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"{arg!r}: overrides are --key=value")
        key, value = arg[2:].split("=", 1)
        if key not in types:
            raise ValueError(f"--{key}: unknown config key")
        setattr(cfg, key, _convert(key, value, types[key]))
    return cfg


# ---- the loss ----------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float):
    """rewards (P, G) -> advantages (P, G), and which groups have zero variance (P,) bool."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(mean)
    adv = rewards - mean
    if std_normalize:
        adv = adv / (std + eps)
    return adv, (rewards == rewards[:, :1]).all(1)


def grpo_loss(logp, old_logp, ref_logp, entropy, adv, mask, n_tokens, clip_eps, kl_coef, entropy_coef):
    """The GRPO objective, negated, for one micro-batch. Every tensor is (B, T) over target positions
    except adv (B,); `mask` marks completion tokens (EOS included: when to stop is what is learned).

    - Token-level clipped surrogate (PPO): ratio = exp(logp - old_logp) against the log-probs the
      rollout sampled with, min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), eps = 0.2.
    - KL: the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman's "low-variance" KL, as in
      GRPO/veRL), *subtracted* from the objective: the loss gets +kl_coef * KL, so its gradient pulls
      the policy toward the reference. (ThinkPrune's official code adds it with the wrong sign.)
    - Entropy bonus: -entropy_coef * H(token distribution) in the loss.
    - Normalisation: summed over completion tokens and divided by n_tokens, the number of completion
      tokens in the whole optimizer step across all ranks (token-level, as DAPO/veRL's token-mean), so
      long completions weigh in proportion to their tokens and micro-batching does not change the loss.
    Returns the loss and detached sums of KL and entropy over the micro-batch's tokens.
    """
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]  # (B, 1), one advantage per completion, broadcast over its tokens
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    log_r = ref_logp - logp if ref_logp is not None else torch.zeros_like(logp)
    kl = torch.exp(log_r) - log_r - 1
    per_token = pg + kl_coef * kl - entropy_coef * entropy
    loss = (per_token * mask).sum() / n_tokens
    return loss, (kl.detach() * mask).sum(), (entropy.detach() * mask).sum()


def _chunk_logprobs(logits, targets, temperature: float, entropy_grad: bool):
    z = logits.float() / temperature  # (C, V) fp32, only for this chunk
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, targets[:, None])[:, 0] - lse
    with nullcontext() if entropy_grad else torch.no_grad():
        entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


def token_logprobs(logits, targets, temperature: float, chunk: int, entropy_grad: bool):
    """logits (B, T, V) in the model dtype, targets (B, T) -> log-probs and entropies (B, T) in fp32,
    at the rollout temperature (so the importance ratio starts at 1). The fp32 log-softmax runs on
    `chunk` positions of one row at a time under activation checkpointing: backward recomputes it from
    the model-dtype logits, so no (B, T, V) fp32 tensor is ever held. `logits` may be a view."""
    B, T, V = logits.shape
    fn = partial(_chunk_logprobs, temperature=temperature, entropy_grad=entropy_grad)
    logp, entropy = [], []
    for b in range(B):
        for s in range(0, T, chunk):
            args = (logits[b, s:s + chunk], targets[b, s:s + chunk])  # (C, V), (C,)
            lp, ent = checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)
            logp.append(lp)
            entropy.append(ent)
    return torch.cat(logp).view(B, T), torch.cat(entropy).view(B, T)


# ---- distributed -------------------------------------------------------------------------------------

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


def setup_distributed(cfg: Config) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device, _ = device_and_dtype(cfg.device or None)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        init_process_group(device.type == "cuda")
    return Dist(rank, world, device)


def load_model(path, d: Dist, trainable: bool, activation_checkpointing: bool = False) -> Transformer:
    """Load an HF dir; shard it with FSDP2 when there are several ranks. The trained model keeps fp32
    master weights; the frozen reference is stored in the compute dtype (bf16 under FSDP on GPU)."""
    compute_dtype = torch.bfloat16 if d.device.type == "cuda" and d.world > 1 else torch.float32
    model = Transformer.from_pretrained(path, device=d.device, dtype=torch.float32 if trainable else compute_dtype)
    model.requires_grad_(trainable)
    if activation_checkpointing:  # recompute each block in backward; wrapping forward keeps parameter names
        for block in model.layers:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if d.device.type == "cuda" and trainable else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


@contextmanager
def unsharded(model):
    """Gather every FSDP module's full parameters for the duration (a no-op without FSDP)."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:  # back to FSDP's defaults: the root keeps its parameters after forward, blocks reshard
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


# ---- data --------------------------------------------------------------------------------------------

def batch_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Problem indices of step `step`: consecutive slices of a seeded permutation per epoch."""
    out, pos = [], step * per_step
    while len(out) < per_step:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[i:i + per_step - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def rollout_seed(seed: int, step: int, who: int) -> int:
    """A seed from (seed, step, who): who is a prompt's place in the step's batch, or an epoch/rank id."""
    return (seed * 1_000_003 + step) * 1_000_003 + who


# ---- one step ----------------------------------------------------------------------------------------

@dataclass
class Rows:
    """The local rollout rows of one step, ready for the update."""
    prompts: list[list[int]]  # prompt ids per row
    tokens: list[torch.Tensor]  # completion ids per row (EOS included)
    old_logp: list[torch.Tensor]  # rollout log-probs per row
    adv: torch.Tensor  # (N,) advantage per row


def micro_batch(rows: Rows, idx: list[int], device):
    """Right-padded (B, T) inputs, next-token targets, completion mask, old log-probs, advantages.
    An empty idx gives one zero-weight dummy row (ranks must run the same number of micro-batches)."""
    if not idx:
        z = torch.zeros(1, 1, dtype=torch.long, device=device)
        return z, z, z.bool(), z.float(), torch.zeros(1, device=device)
    seqs = [rows.prompts[i] + rows.tokens[i].tolist() for i in idx]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(idx), T, dtype=torch.long)
    targets = torch.zeros(len(idx), T, dtype=torch.long)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    old = torch.zeros(len(idx), T)
    for b, (i, s) in enumerate(zip(idx, seqs)):
        s = torch.tensor(s)
        inputs[b, :len(s) - 1], targets[b, :len(s) - 1] = s[:-1], s[1:]
        P, C = len(rows.prompts[i]), len(rows.tokens[i])
        mask[b, P - 1:P - 1 + C] = True  # position t predicts token t+1: completions start at P-1
        old[b, P - 1:P - 1 + C] = rows.old_logp[i]
    return (inputs.to(device), targets.to(device), mask.to(device), old.to(device), rows.adv[idx].to(device))


def update(model, ref, opt, rows: Rows, keep: list[int], cfg: Config, d: Dist, step: int) -> dict:
    """ppo_epochs x minibatches optimizer steps over the kept rows. Returns update metrics."""
    kl_sum = ent_sum = loss_sum = 0.0
    n_tok_total, grad_norms, skipped = 0, [], 0
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(rollout_seed(cfg.seed, step, 1_000 * epoch + d.rank))
        order = [keep[i] for i in torch.randperm(len(keep), generator=g).tolist()]
        for mb in range(cfg.minibatches):
            mine = order[mb::cfg.minibatches]
            n_tok = int(d.all_sum(torch.tensor([sum(len(rows.tokens[i]) for i in mine)]))[0])
            if n_tok == 0:
                continue  # no row on any rank: nothing to learn from this minibatch
            chunks = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
            chunks += [[]] * (d.all_max(len(chunks)) - len(chunks))  # pair up FSDP collectives
            mb_loss = torch.zeros(())
            for idx in chunks:
                inputs, targets, mask, old, adv = micro_batch(rows, idx, d.device)
                s = int(mask.float().argmax(1).min())  # log-probs from the first completion position on
                targets, mask, old = targets[:, s:], mask[:, s:], old[:, s:]
                ref_logp = None
                if ref is not None:
                    with torch.no_grad():
                        ref_logp, _ = token_logprobs(ref(inputs)[:, s:], targets, cfg.temperature,
                                                     cfg.logprob_chunk, False)
                logp, entropy = token_logprobs(model(inputs)[:, s:], targets, cfg.temperature, cfg.logprob_chunk,
                                               cfg.entropy_coef > 0)
                loss, kl, ent = grpo_loss(logp, old, ref_logp, entropy, adv, mask.float(), n_tok, cfg.clip_eps,
                                          cfg.kl_coef, cfg.entropy_coef)
                (loss * d.world).backward()  # FSDP averages gradients over ranks; we want their sum
                mb_loss += loss.detach().cpu()
                kl_sum, ent_sum = kl_sum + float(kl), ent_sum + float(ent)
            mb_loss = float(d.all_sum(mb_loss.view(1))[0])
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(mb_loss) and math.isfinite(norm):
                opt.step()
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
            loss_sum, n_tok_total = loss_sum + mb_loss, n_tok_total + n_tok
            grad_norms.append(norm)
    totals = d.all_sum(torch.tensor([kl_sum, ent_sum]))
    return {"loss": loss_sum, "kl": float(totals[0]) / max(n_tok_total, 1),
            "entropy": float(totals[1]) / max(n_tok_total, 1),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "skipped": skipped, "optimizer_steps": len(grad_norms) - skipped}


def train_step(model, ref, opt, tokenizer, problems, prompts, eos_ids, cfg: Config, d: Dist, step: int,
               reward_fn) -> tuple[dict, list[str]]:
    """One rollout batch and its update. Returns metrics and a few decoded samples (rank 0's)."""
    G = cfg.samples_per_prompt
    idx = batch_indices(len(problems), cfg.prompts_per_step, cfg.seed, step)
    per_rank = cfg.prompts_per_step // d.world
    mine = idx[d.rank * per_rank:(d.rank + 1) * per_rank]
    seeds = [rollout_seed(cfg.seed, step, d.rank * per_rank + j) for j in range(len(mine))]  # by place in batch

    # 1. rollout on the unsharded model
    t0 = time.perf_counter()
    with unsharded(model), torch.no_grad():
        ro = generate(model, [prompts[k] for k in mine], n=G, max_new_tokens=cfg.limit, temperature=cfg.temperature,
                      eos_ids=eos_ids, seed=seeds, max_batch=cfg.rollout_batch)
    ro = Rollout(tokens=ro.tokens.cpu(), logprobs=ro.logprobs.cpu(), lengths=ro.lengths.cpu(),
                 finished=ro.finished.cpu(), prompt_index=ro.prompt_index.cpu())
    rollout_s = time.perf_counter() - t0

    # 2. rewards (unfinished -> 0 inside reward_fn) and group advantages
    texts, rewards, correct = [], [], []
    for i in range(len(ro.lengths)):
        toks = ro.tokens[i, :ro.lengths[i]].tolist()
        text = tokenizer.decode(toks, skip_special_tokens=True)
        gold = problems[mine[int(ro.prompt_index[i])]]["answer"]
        texts.append(text)
        rewards.append(reward_fn(text, gold, bool(ro.finished[i])))
        # accuracy ignores the cutoff: is the answer right even when the completion ran past L?
        correct.append(rewards[-1] if ro.finished[i] else reward_fn(text, gold, True))
    rewards = torch.tensor(rewards, dtype=torch.float32)
    adv, zero_var = group_advantages(rewards.view(-1, G), cfg.std_normalize, cfg.adv_eps)  # (P, G), (P,)
    keep = [i for i in range(len(rewards)) if not (cfg.skip_zero_var_groups and zero_var[i // G])]
    rows = Rows(prompts=[prompts[mine[int(p)]] for p in ro.prompt_index],
                tokens=[ro.tokens[i, :ro.lengths[i]] for i in range(len(rewards))],
                old_logp=[ro.logprobs[i, :ro.lengths[i]] for i in range(len(rewards))], adv=adv.view(-1))

    # 3. update
    t0 = time.perf_counter()
    model.train()
    stats = update(model, ref, opt, rows, keep, cfg, d, step)
    update_s = time.perf_counter() - t0

    # 4. metrics over all ranks
    all_r, all_c = d.gather(rewards), d.gather(torch.tensor(correct))
    lengths, finished = d.gather(ro.lengths.float()), d.gather(ro.finished.float())
    n_zero_var = int(d.all_sum(zero_var.sum().view(1))[0])
    metrics = {"step": step + 1, "limit": cfg.limit, "reward": float(all_r.mean()), "accuracy": float(all_c.mean()),
               "mean_len": float(lengths.mean()), "p90_len": float(lengths.quantile(0.9)),
               "truncation_rate": 1 - float(finished.mean()), "entropy": stats["entropy"], "kl": stats["kl"],
               "loss": stats["loss"], "grad_norm": stats["grad_norm"], "zero_var_groups": n_zero_var,
               "skipped": stats["skipped"], "tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9),
               "rollout_s": rollout_s, "update_s": update_s, "lr": opt.param_groups[0]["lr"]}
    samples = [f"=== step {step + 1} | row {i} | reward {float(rewards[i]):.0f} | {int(ro.lengths[i])} tokens | "
               f"{'finished' if ro.finished[i] else 'CUT OFF'} | gold {problems[mine[int(ro.prompt_index[i])]]['answer']}\n"
               f"{tokenizer.decode(rows.prompts[i])}{texts[i]}\n" for i in range(min(cfg.num_samples, len(texts)))]
    return metrics, samples


# ---- checkpoints -------------------------------------------------------------------------------------

def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in out_dir.glob("step_*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(model, opt, cfg: Config, d: Dist, step: int, out_dir: Path, n_problems: int):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=full)  # collectives: every rank takes part
    osd = get_optimizer_state_dict(model, opt, options=full)
    if d.rank == 0:
        tmp, final = out_dir / f".tmp_step_{step:06d}", out_dir / f"step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        torch.save(osd, tmp / "optimizer.pt")  # apart from trainer_state.pt: only rank 0 reads it back
        state = {"step": step, "config": asdict(cfg), "world_size": d.world,
                 "data_position": divmod(step * cfg.prompts_per_step, n_problems),  # (epoch, index)
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out_dir.glob("step_*"))[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()



def _log_metrics_open(out_dir: Path, resume_step: int):
    """Open metrics.jsonl for appending, first dropping lines past the resumed step (and a line torn by
    the kill); the cut-back file is written under a temporary name and renamed, so a kill keeps it."""
    path = out_dir / "metrics.jsonl"
    if path.exists():
        kept = []
        for ln in path.read_text().split("\n"):
            try:
                if json.loads(ln)["step"] <= resume_step:
                    kept.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # empty, or torn mid-write
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)
    return open(path, "a")


def main(cfg: Config, reward_fn=None) -> str:
    """Train with `cfg`; returns out_dir. reward_fn(text, gold, finished) defaults to reward.score."""
    from transformers import AutoTokenizer
    reward_fn = reward_fn or reward.score
    d = setup_distributed(cfg)
    if cfg.prompts_per_step % d.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of world size {d.world}")
    if not cfg.temperature > 0:
        raise ValueError(f"temperature={cfg.temperature}: training samples, it needs temperature > 0")
    out_dir = Path(cfg.out_dir)
    if d.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in out_dir.glob(".tmp_step_*"):  # left by a kill during a save
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(asdict(cfg), indent=1), flush=True)
    if d.world > 1:
        dist.barrier()

    # data: load, build prompts, drop the ones over max_prompt_tokens
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    problems = load_problems(cfg.train_data)
    prompts = [build_prompt(tokenizer, p["problem"], cfg.limit, cfg.system_prompt) for p in problems]
    fits = [i for i, p in enumerate(prompts) if len(p) <= cfg.max_prompt_tokens]
    if d.rank == 0 and len(fits) < len(problems):
        print(f"dropped {len(problems) - len(fits)} of {len(problems)} prompts longer than "
              f"max_prompt_tokens={cfg.max_prompt_tokens}", flush=True)
    problems, prompts = [problems[i] for i in fits], [prompts[i] for i in fits]
    if not problems:
        raise ValueError(f"{cfg.train_data}: no prompt fits in max_prompt_tokens={cfg.max_prompt_tokens}")
    eos_ids = {tokenizer.eos_token_id} - {None}
    cfg_eos = json.loads((Path(cfg.model) / "config.json").read_text()).get("eos_token_id")
    eos_ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    eos_ids = sorted(eos_ids)

    # model, reference, optimizer; resume from the newest complete checkpoint of out_dir
    resume = latest_checkpoint(out_dir)
    model = load_model(resume or cfg.model, d, trainable=True, activation_checkpointing=cfg.activation_checkpointing)
    model.source_dir = cfg.model  # tokenizer files come from here: keep_last may delete the resumed checkpoint
    ref = load_model(cfg.model, d, trainable=False).eval() if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=False)
        # the full optimizer state (2x the fp32 weights: 61 GB at 7B) is read by rank 0 alone and
        # broadcast into the shards, not held in host memory once per rank
        osd = torch.load(resume / "optimizer.pt", map_location="cpu", weights_only=True) if d.rank == 0 else {}
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=d.world > 1,
                                                                             broadcast_from_rank0=d.world > 1))
        start = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if tuple(state["data_position"]) != divmod(start * cfg.prompts_per_step, len(problems)):
            raise ValueError(f"{resume}: saved with a different data set or prompts_per_step")
        changed = {k: v for k, v in asdict(cfg).items() if state["config"].get(k) != v}
        if d.rank == 0:
            print(f"resuming from {resume} (step {start}); config changes since: {changed or 'none'}", flush=True)

    # logging
    log = tb = wb = bar = None
    if d.rank == 0:
        log = _log_metrics_open(out_dir, start)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                print("tensorboard=true but tensorboard is not installed: skipping it", flush=True)
        if cfg.wandb:
            try:
                import wandb
                wb = wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out_dir), resume="allow")
            except ImportError:
                print("wandb=true but wandb is not installed: skipping it", flush=True)
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)

    for step in range(start, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        metrics, samples = train_step(model, ref, opt, tokenizer, problems, prompts, eos_ids, cfg, d, step,
                                      reward_fn)
        if d.rank == 0:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(k, v, step + 1)
            if wb is not None:
                wb.log(metrics, step=step + 1)
            if cfg.sample_every > 0 and (step + 1) % cfg.sample_every == 0:
                with open(out_dir / "samples.txt", "a") as f:
                    f.write("".join(samples))
            if metrics["skipped"]:
                print(f"step {step + 1}: non-finite loss or grad norm, optimizer step skipped", flush=True)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['mean_len']:.0f}")
            bar.update(1)
        if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            save_checkpoint(model, opt, cfg, d, step + 1, out_dir, len(problems))

    if d.rank == 0:
        bar.close()
        log.close()
        if tb is not None:
            tb.close()
        if wb is not None:
            wb.finish()
    if d.world > 1:
        destroy_process_group()
    return str(out_dir)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--"):
        main(load_config(sys.argv[1], sys.argv[2:]))
    else:
        main(load_config(None, sys.argv[1:]))
