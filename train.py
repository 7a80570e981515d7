"""
ThinkPrune training: GRPO under a hard token limit L, on one process or many (torchrun + FSDP2).

    python train.py configs/tiny.py --steps=20                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py configs/stage1.py      # FSDP2 over 8 GPUs
    python train.py configs/stage1.py --limit=3000 --lr=2e-6    # --key=value overrides the config file

A completion with no EOS within its first L generated tokens gets reward 0 whatever it says; a
finished one gets 1 if its \\boxed{} answer is right (reward.score). The policy learns that thinking
past L is worth nothing, and learns to stop. A step (`train_step`): the step's problems (a seeded
order per epoch, split over ranks), G samples of each (rollout.generate, max_new_tokens = L), rewards,
group advantages, `update` (micro-batches, `grpo_loss`), metrics, and a checkpoint now and then.

Choices:
- Rollouts run on a plain model over the gathered weights (`unsharded`): no collective per decode step,
  so ranks whose rows stop at different lengths never wait for each other, and no FSDP hooks.
- Rewards, then advantages, then the loss, with every length-control choice in between (DESIGN.md; the
  Config's keys name their sources; the defaults are ThinkPrune's). Each token's weight in the loss is
  set for the whole step on all ranks (`loss_agg`), times the world size because FSDP averages
  gradients; every rank runs the same number of micro-batches (empty ones too), so collectives pair up.
- Samples are seeded by (seed, step, the prompt's place in the step's batch), the data order by (seed,
  epoch): a run does not depend on the world size, and a resumed run is the run that was killed.
- One process on a GPU trains in fp32 (TF32 matmuls); under torchrun FSDP2 keeps fp32 master weights
  and computes in bf16. A non-finite loss or grad norm skips the optimizer step (logged as `skipped`).
Simplifications: the full model is loaded on every rank before sharding; every micro-batch's backward
reduce-scatters; rollouts use our own sampler, not vLLM.
"""

import json
import math
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import checkpoint as ckpt
import distributed
import memory
import reward
from config import check, choice, load_config
from data import DATA_DIR, SYSTEM_PROMPT, batch_indices, build_prompt, eos_ids, load_problems, seed_for
from distributed import Dist
from model import ModelArgs, Transformer, attention_backend, check_dir
from report import write_text
from rollout import generate


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
    rollout_batch: int | str = 256  # KV-cache slots per generate call; "auto": on CUDA the most whose rollout fits
    # in the free memory by memory.py's plan, on the CPU all of a rank's rows (the start-up print says which)
    cuda_graphs: bool | None = None  # replay decode steps from CUDA graphs (rollout.generate); None: on CUDA
    # length control (DESIGN.md, "where each choice lives"); the defaults are ThinkPrune's
    truncation: str = "zero"  # a completion with no EOS within its limit: "zero" reward 0 (ThinkPrune's paper);
    # "keep" graded as the cut text stands (the official ThinkPrune code, veRL); "mask" left out of the loss and
    # of its group's statistics (DAPO's overlong filtering, TRL mask_truncated_completions); "soft" graded as it
    # stands plus DAPO's overlong term: 0 up to limit - soft_buffer, linear to -1 at the limit, -1 when cut off
    soft_buffer: int = 0  # "soft" only, in tokens (DAPO: 4096 of 20480)
    length_penalty: str = "none"  # group-relative length shaping: "kimi" (Kimi 1.5), "arora" (Arora & Zanette 2025)
    length_coef: float = 0.0  # its weight: Kimi's lambda term x coef; Arora & Zanette's alpha
    # GRPO
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # the ratio's upper bound 1 + clip_eps_high (DAPO clip-higher, DLER 0.28); None = clip_eps
    kl_coef: float = 0.001  # k3 KL to the starting model; 0 -> no reference model is loaded
    entropy_coef: float = 0.001
    adv_norm: str = "group"  # r - group mean, divided by the group std (GRPO), the step's std (DLER: "batch"), or not ("none", Dr. GRPO)
    adv_eps: float = 1e-6
    loss_agg: str = "token-mean"  # "token-mean" (DAPO, DLER), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum-norm" (Dr. GRPO)
    skip_zero_var_groups: bool = True
    dynamic_sampling: bool = False  # draw more prompts until prompts_per_step groups have unequal rewards (DAPO, DLER)
    max_sample_rounds: int = 3  # at most this many rollout rounds per step with dynamic_sampling
    minibatches: int = 1  # optimizer steps per epoch over one rollout batch
    ppo_epochs: int = 1
    # old log-probs of the ratio from the trainer's forward, not the sampler's (veRL's choice); None: on CUDA
    # (bf16 kernels differ between the two), off on the CPU (fp32: they agree to rounding)
    recompute_old_logp: bool | None = None
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
    logprob_chunk: int = 2048  # positions per chunk of the head and its fp32 log-softmax
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

    def check(self):
        """Every value in range before anything loads; the key is named (config.check)."""
        choice("truncation", self.truncation, ("zero", "keep", "mask", "soft"))
        choice("length_penalty", self.length_penalty, ("none", "kimi", "arora"))
        choice("adv_norm", self.adv_norm, ("group", "batch", "none"))
        choice("loss_agg", self.loss_agg, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
        for key in ("limit", "prompts_per_step", "minibatches", "ppo_epochs", "steps",
                    "micro_batch_size", "logprob_chunk", "max_prompt_tokens", "max_sample_rounds"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.rollout_batch == "auto" or (isinstance(self.rollout_batch, int) and self.rollout_batch >= 1),
              "rollout_batch", self.rollout_batch, "an int >= 1, or 'auto'")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", self.samples_per_prompt,
              "GRPO compares samples of one prompt: give G >= 2")
        for key in ("warmup_steps", "save_every", "keep_last", "sample_every", "num_samples", "seed"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for key in ("temperature", "adv_eps"):
            check(0 < getattr(self, key) < math.inf, key, getattr(self, key), "a finite number > 0")
        check(0 < self.lr <= 1, "lr", self.lr, "must be in (0, 1]: AdamW diverges at once above that")
        for key in ("clip_eps", "kl_coef", "entropy_coef", "weight_decay", "grad_clip", "length_coef"):
            check(0 <= getattr(self, key) < math.inf, key, getattr(self, key), "a finite number >= 0")
        check(self.clip_eps_high is None or 0 <= self.clip_eps_high < math.inf, "clip_eps_high", self.clip_eps_high,
              "a finite number >= 0, or None for clip_eps")
        check(self.clip_eps < 1, "clip_eps", self.clip_eps, "must be < 1 (the lower bound 1 - clip_eps > 0)")
        for key in ("beta1", "beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "must be in [0, 1)")
        check(self.truncation != "soft" or 0 < self.soft_buffer < self.limit, "soft_buffer", self.soft_buffer,
              f"truncation='soft' needs 0 < soft_buffer < limit ({self.limit})")
        check(self.length_penalty == "none" or self.length_coef > 0, "length_coef", self.length_coef,
              f"length_penalty={self.length_penalty!r} needs length_coef > 0")
        check("{L}" in self.system_prompt, "system_prompt", self.system_prompt[:60] + "...",
              "must contain {L}, where the limit is stated")


# ---- rewards, advantages, the loss -------------------------------------------------------------------

def shape_rewards(reward, correct, finished, lengths, limits, cfg: Config):
    """The rewards the policy sees, and which rows count (valid), all (P, G). reward: reward_fn's verdict
    with the cutoff (0 for a cut completion); correct: its verdict on the text as it stands. Step 2 and 3
    of DESIGN.md: the truncation policy, then an optional group-relative length term."""
    cut, L = ~finished, limits.float()
    valid = torch.ones_like(finished)
    if cfg.truncation == "zero":
        r = reward.clone()
    elif cfg.truncation == "keep":
        r = correct.clone()
    elif cfg.truncation == "mask":
        r, valid = reward.clone(), finished.clone()
    else:  # "soft": DAPO's overlong term, 0 up to L - buffer, linear to -1 at L, -1 when cut off
        over = ((L - cfg.soft_buffer - lengths) / cfg.soft_buffer).clamp(-1, 0)
        r = correct + torch.where(cut, -1.0, over)
    if cfg.length_penalty != "none":
        n = lengths.float().masked_fill(~valid, float("nan"))
        lo, hi = n.nanquantile(0.0, 1, keepdim=True), n.nanquantile(1.0, 1, keepdim=True)  # min, max over valid rows
        ok = correct > 0.5
        if cfg.length_penalty == "kimi":  # Kimi 1.5: lambda = 0.5 - (len - min) / (max - min); wrong rows min(0, lambda)
            lam = torch.where(hi > lo, 0.5 - (n - lo) / (hi - lo), torch.zeros_like(n))
            r = r + cfg.length_coef * torch.where(ok, lam, lam.clamp(max=0))
        else:  # "arora", Arora & Zanette: correct rows x (1 - alpha * sigmoid(z)), z over the group's correct lengths
            m = n.masked_fill(~ok, float("nan"))
            mean = m.nanmean(1, keepdim=True)
            std = ((m - mean) ** 2).nansum(1, keepdim=True).div((ok & valid).sum(1, keepdim=True).clamp(min=1)).sqrt()
            z = ((n - mean) / (std + cfg.adv_eps)).nan_to_num(0.0)
            r = torch.where(ok, r * (1 - cfg.length_coef * torch.sigmoid(z)), r)
    return r.masked_fill(~valid, 0.0), valid


def has_signal(rewards, valid):
    """rewards, valid (P, G) -> (P,): groups with two or more valid rows whose rewards differ (a NaN
    reward differs, so the loss catches it)."""
    first = rewards.gather(1, valid.float().argmax(1, keepdim=True))  # (P, 1) a valid row's reward
    return (valid.sum(1) >= 2) & ~((rewards == first) | ~valid).all(1)


def advantages(rewards, valid, use, cfg: Config, d: Dist):
    """rewards, valid (P, G), use (P,): the groups that enter the update -> advantages (P, G), and which
    groups carry signal (P,): two or more valid rows whose rewards differ. Rows are centred on their
    group's mean over valid rows; then "group" divides by the group's std (GRPO, unbiased as veRL),
    "batch" by the std of the centred rewards of every used row of the step on all ranks (DLER; veRL
    whitens token-weighted), "none" keeps r - mean (Dr. GRPO). Invalid rows get 0."""
    v = valid.float()
    n = v.sum(1, keepdim=True)
    c = (rewards - (rewards * v).sum(1, keepdim=True) / n.clamp(min=1)) * v  # (P, G) centred
    if cfg.adv_norm == "group":
        c = c / ((c ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(cfg.adv_eps)
    elif cfg.adv_norm == "batch":
        u = v * use[:, None]
        rows, sq = d.all_sum(torch.stack([u.sum(), (c ** 2 * u).sum()]).double()).tolist()
        c = c / (math.sqrt(sq / max(rows - 1, 1)) + cfg.adv_eps)
    return c, has_signal(rewards, valid)


def grpo_loss(logp, old_logp, ref_logp, entropy, adv, weight, clip_low, clip_high, kl_coef, entropy_coef):
    """The GRPO objective, negated, for one micro-batch. Every tensor is (B, T) over target positions
    except adv (B,); `weight` is each token's weight in the step's loss, 0 off the completion (EOS is
    on it: when to stop is what is learned).

    - Clipped surrogate (PPO), token by token: ratio = exp(logp - old_logp) against the log-probs the
      rollout sampled with; min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A). clip_high >
      clip_low is DAPO's clip-higher (DLER: 0.28 vs 0.2), room for unlikely tokens to grow.
    - KL: the k3 estimator exp(ref - logp) - (ref - logp) - 1 (as GRPO/veRL), *subtracted* from the
      objective, so its gradient pulls the policy toward the reference (ThinkPrune's official code adds it
      with the wrong sign). Entropy bonus: -entropy_coef * H.
    - Aggregation is in `weight` (update: `loss_agg`): 1 / the step's completion tokens on all ranks
      gives token-mean (DAPO, DLER), so micro-batching and ranks do not change the loss.
    Returns the loss and detached sums over completion tokens: KL, entropy, tokens clipped low and high
    (where the clip is active), tokens whose ratio is outside the clip range.
    """
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]  # (B, 1), one advantage per completion, broadcast over its tokens
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
    log_r = ref_logp - logp if ref_logp is not None else torch.zeros_like(logp)
    kl = torch.exp(log_r) - log_r - 1
    loss = ((pg + kl_coef * kl - entropy_coef * entropy) * weight).sum()
    on = (weight > 0).float()
    stats = {"kl": (kl.detach() * on).sum(), "entropy": (entropy.detach() * on).sum(),  # the clip is active where
             "clip_low": (((ratio < 1 - clip_low) & (A < 0)) * on).sum(),            # it lowers the objective
             "clip_high": (((ratio > 1 + clip_high) & (A > 0)) * on).sum(),
             "ratio_out": (((ratio < 1 - clip_low) | (ratio > 1 + clip_high)) * on).sum()}
    return loss, stats


# ---- the model under FSDP2 ---------------------------------------------------------------------------

def load_model(path, d: Dist, trainable: bool, activation_checkpointing: bool = False) -> Transformer:
    """Load an HF dir; shard it with FSDP2 (`fully_shard` per block, then the root) when there are several
    ranks. The trained model keeps fp32 master weights; the frozen reference is stored in the compute
    dtype (bf16 under FSDP on GPU)."""
    compute_dtype = torch.bfloat16 if d.device.type == "cuda" and d.world > 1 else torch.float32
    model = Transformer.from_pretrained(path, device=d.device, dtype=torch.float32 if trainable else compute_dtype)
    model.requires_grad_(trainable)
    if activation_checkpointing:  # recompute each block in backward; wrapping forward keeps parameter names
        for block in model.layers:
            block.forward = partial(_checkpointed, block.forward)
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if d.device.type == "cuda" and trainable else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        # the frozen reference's root (embedding, head) is freed after its forward; the policy's is kept for backward
        fully_shard(model, mp_policy=mp, reshard_after_forward=None if trainable else True)
    return model


def _checkpointed(forward, *args):
    """Activation checkpointing where gradients are recorded; a plain call in rollouts (no RNG state saved)."""
    return checkpoint(forward, *args, use_reentrant=False) if torch.is_grad_enabled() else forward(*args)


@contextmanager
def unsharded(model):
    """Gather every FSDP module's full parameters and yield a plain Transformer on them for decoding: no
    FSDP hooks, no checkpoint wrappers and no collectives per step, so ranks whose rows stop at different
    lengths never wait for each other. Without FSDP it yields the model itself."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield model
        return
    for m in mods:
        m.unshard()  # waits: each module's parameters are now plain tensors holding the full weights
    try:
        with torch.device("meta"):
            plain = Transformer(model.args)
        plain.load_state_dict({n: p.detach() for n, p in model.named_parameters()}, strict=False, assign=True)
        if model.args.tie_word_embeddings:
            plain.lm_head.weight = plain.embed_tokens.weight
        yield plain
    finally:
        for m in mods:
            m.reshard()


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


def row_weights(rows: Rows, mine: list[int], cfg: Config, d: Dist) -> dict:
    """Each row's per-token weight in one optimizer step's loss, by `loss_agg`: "token-mean" 1 / the
    step's tokens (DAPO, DLER); "seq-mean-token-mean" 1 / (the row's tokens x the step's rows) (GRPO);
    "seq-mean-token-sum-norm" 1 / (cfg.limit x the step's rows) (Dr. GRPO: token sums over a constant).
    Counts are over all ranks; {} when no rank has a row."""
    n_rows, n_tok = d.all_sum(torch.tensor([len(mine), sum(len(rows.tokens[i]) for i in mine)])).tolist()
    if n_rows == 0:
        return {}
    if cfg.loss_agg == "token-mean":
        return {i: 1 / n_tok for i in mine}
    if cfg.loss_agg == "seq-mean-token-mean":
        return {i: 1 / (len(rows.tokens[i]) * n_rows) for i in mine}
    return {i: 1 / (cfg.limit * n_rows) for i in mine}


def micro_batches(rows: Rows, idxs: list[int], cfg: Config, d: Dist):
    """Micro-batches of this rank's rows `idxs`, as micro_batch gives them but cut to start at the first
    completion position; padded with empty ones so that every rank runs as many (FSDP's collectives)."""
    chunks = [idxs[i:i + cfg.micro_batch_size] for i in range(0, len(idxs), cfg.micro_batch_size)]
    chunks += [[]] * (d.all_max(len(chunks)) - len(chunks))
    for idx in chunks:
        inputs, targets, mask, old, adv = micro_batch(rows, idx, d.device)
        s = int(mask.float().argmax(1).min())  # log-probs from the first completion position on
        yield idx, inputs, targets[:, s:], mask[:, s:], old[:, s:], adv


@torch.no_grad()
def recompute_old_logp(model, rows: Rows, keep: list[int], cfg: Config, d: Dist):
    """Replace the sampler's log-probs of the kept rows by the trainer's forward (veRL's choice): their
    kernels differ (bf16 on GPU), so with the sampler's the first ratio is numerical mismatch alone, and
    the clip can cut tokens before the policy has moved."""
    for idx, inputs, targets, mask, _, _ in micro_batches(rows, keep, cfg, d):
        logp, _ = model(inputs, targets=targets, temperature=cfg.temperature, chunk=cfg.logprob_chunk)
        for b, i in enumerate(idx):
            rows.old_logp[i] = logp[b][mask[b]].float().cpu()


def update(model, ref, opt, rows: Rows, keep: list[int], cfg: Config, d: Dist, step: int) -> dict:
    """ppo_epochs x minibatches optimizer steps over the kept rows. Returns update metrics, among them
    ratio_out_first: the fraction of the first minibatch's tokens whose ratio is outside the clip range
    before any step (0 when the old log-probs are the trainer's own)."""
    sums = dict.fromkeys(("kl", "entropy", "clip_low", "clip_high", "ratio_out", "tokens"), 0.0)
    loss_sum, grad_norms, skipped, first = 0.0, [], 0, None
    clip_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(seed_for(cfg.seed, step, 1_000 * epoch + d.rank))
        order = [keep[i] for i in torch.randperm(len(keep), generator=g).tolist()]
        for mb in range(cfg.minibatches):
            mine = order[mb::cfg.minibatches]
            w = row_weights(rows, mine, cfg, d)
            if not w:
                continue  # no row on any rank: nothing to learn from this minibatch
            mb_loss = torch.zeros(())
            for idx, inputs, targets, mask, old, adv in micro_batches(rows, mine, cfg, d):
                weight = mask * torch.tensor([w[i] for i in idx] or [0.0], device=d.device)[:, None]  # (B, T)
                lp_kw = dict(targets=targets, temperature=cfg.temperature, chunk=cfg.logprob_chunk)
                ref_logp = None
                if ref is not None:
                    with torch.no_grad():
                        ref_logp, _ = ref(inputs, **lp_kw)
                logp, entropy = model(inputs, **lp_kw, entropy_grad=cfg.entropy_coef > 0)
                loss, stats = grpo_loss(logp, old, ref_logp, entropy, adv, weight, cfg.clip_eps, clip_high,
                                        cfg.kl_coef, cfg.entropy_coef)
                (loss * d.world).backward()  # FSDP averages gradients over ranks; we want their sum
                mb_loss += loss.detach().cpu()
                for k, v in stats.items():
                    sums[k] += float(v)
                sums["tokens"] += float(mask.sum())
            if first is None:
                first = d.all_sum(torch.tensor([sums["ratio_out"], sums["tokens"]], dtype=torch.float64)).tolist()
            mb_loss = float(d.all_sum(mb_loss.view(1))[0])
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(mb_loss) and math.isfinite(norm):
                opt.step()
                check_finite(model, step)
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
            loss_sum += mb_loss
            grad_norms.append(norm)
    tot = dict(zip(sums, d.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    per_token = {k: tot[k] / max(tot["tokens"], 1) for k in ("kl", "entropy", "clip_low", "clip_high")}
    return {"loss": loss_sum, **per_token, "ratio_out_first": first[0] / max(first[1], 1) if first else 0.0, "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "skipped": skipped, "optimizer_steps": len(grad_norms) - skipped}


def check_finite(model, step: int):
    """Stop the run, naming the step and a parameter, if an optimizer step made any weight non-finite:
    nothing after it (a checkpoint above all) may carry NaN or inf."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise FloatingPointError(f"step {step + 1}: the optimizer step made {len(bad)} parameter(s) non-finite, "
                                 f"e.g. {bad[0]!r} (is lr too high?); nothing was saved for this step")


def rollout_round(model, tokenizer, problems, prompts, idx: list[int], seeds: list[int], eos, cfg: Config, reward_fn):
    """Sample G completions of each problem in idx and grade them. Returns a dict of per-row lists and
    (P, G) tensors: reward (with the cutoff), correct (the text as it stands), finished, lengths, limits."""
    G = cfg.samples_per_prompt
    limits = [problems[k].get("limit", cfg.limit) for k in idx]
    with unsharded(model) as plain, torch.no_grad():
        ro = generate(plain, [prompts[k] for k in idx], n=G, max_new_tokens=limits, temperature=cfg.temperature,
                      eos_ids=eos, seed=seeds, max_batch=cfg.rollout_batch, cuda_graphs=cfg.cuda_graphs)
    lengths, finished = ro.lengths.cpu(), ro.finished.cpu()
    texts, reward, correct = [], [], []
    for i in range(len(lengths)):
        text = tokenizer.decode(ro.tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
        gold = problems[idx[i // G]]["answer"]
        texts.append(text)
        reward.append(reward_fn(text, gold, bool(finished[i])))
        # graded as it stands: the accuracy metric, and the "keep" and "soft" policies
        correct.append(reward[-1] if finished[i] else reward_fn(text, gold, True))
    return {"idx": idx, "texts": texts, "prompts": [prompts[idx[i // G]] for i in range(len(texts))],
            "tokens": [ro.tokens[i, :lengths[i]].cpu() for i in range(len(texts))],
            "old_logp": [ro.logprobs[i, :lengths[i]].cpu() for i in range(len(texts))],
            "reward": torch.tensor(reward, dtype=torch.float32).view(-1, G),
            "correct": torch.tensor(correct, dtype=torch.float32).view(-1, G),
            "finished": finished.view(-1, G), "lengths": lengths.view(-1, G),
            "limits": torch.tensor(limits)[:, None].expand(-1, G)}


def train_step(model, ref, opt, tokenizer, problems, prompts, eos: list[int], cfg: Config, d: Dist, step: int,
               pos: int, reward_fn) -> tuple[dict, list[str], int]:
    """One step: rollouts (with dynamic_sampling, more rounds until enough groups carry signal), rewards,
    advantages, the update. `pos` is the run's position in the data order; returns metrics, a few
    decoded samples (rank 0's) and the new position."""
    per_rank = cfg.prompts_per_step // d.world
    t0 = time.perf_counter()
    rounds, kept = [], 0
    # 1. rollouts on the unsharded model, each prompt's samples seeded by its place in the step's draws
    while True:
        r = len(rounds)
        idx = batch_indices(len(problems), cfg.prompts_per_step, cfg.seed, pos)[d.rank * per_rank:(d.rank + 1) * per_rank]
        pos += cfg.prompts_per_step
        seeds = [seed_for(cfg.seed, step, r * cfg.prompts_per_step + d.rank * per_rank + j) for j in range(per_rank)]
        ro = rollout_round(model, tokenizer, problems, prompts, idx, seeds, eos, cfg, reward_fn)
        # 2. the rewards the policy sees (truncation policy, length term)
        ro["shaped"], ro["valid"] = shape_rewards(ro["reward"], ro["correct"], ro["finished"], ro["lengths"],
                                                  ro["limits"], cfg)
        ro["signal"] = has_signal(ro["shaped"], ro["valid"])
        rounds.append(ro)
        kept += int(ro["signal"].sum())
        # all ranks agree on the rounds: the one furthest from its share decides
        if not cfg.dynamic_sampling or len(rounds) == cfg.max_sample_rounds or d.all_max(per_rank - kept) <= 0:
            break
    rollout_s = time.perf_counter() - t0
    if d.device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache's blocks, for the update's activations
    cat = {k: torch.cat([ro[k] for ro in rounds]) if torch.is_tensor(rounds[0][k]) else sum((ro[k] for ro in rounds), [])
           for k in rounds[0]}

    # 3. which groups enter the update, their advantages
    use = cat["signal"] if cfg.skip_zero_var_groups or cfg.dynamic_sampling else torch.ones_like(cat["signal"])
    if cfg.dynamic_sampling:  # this rank's share of groups with signal, in the order they were drawn
        use = use & (use.cumsum(0) <= per_rank)
    adv, _ = advantages(cat["shaped"], cat["valid"], use, cfg, d)
    G = cfg.samples_per_prompt
    keep = [i for i in range(len(cat["texts"])) if use[i // G] and cat["valid"].view(-1)[i]]
    rows = Rows(prompts=cat["prompts"], tokens=cat["tokens"], old_logp=cat["old_logp"], adv=adv.view(-1))

    # 4. update
    t0 = time.perf_counter()
    model.train()
    if cfg.recompute_old_logp if cfg.recompute_old_logp is not None else d.device.type == "cuda":
        recompute_old_logp(model, rows, keep, cfg, d)
    stats = update(model, ref, opt, rows, keep, cfg, d, step)
    update_s = time.perf_counter() - t0

    # 5. metrics over all rows drawn, all ranks
    reward, correct = d.gather(cat["shaped"].view(-1)), d.gather(cat["correct"].view(-1))
    lengths, finished = d.gather(cat["lengths"].reshape(-1).float()), d.gather(cat["finished"].reshape(-1).float())
    groups = d.all_sum(torch.tensor([len(cat["signal"]), int((~cat["signal"]).sum()), int(use.sum())]))
    metrics = {"step": step + 1, "limit": cfg.limit, "reward": float(reward.mean()), "accuracy": float(correct.mean()),
               "mean_len": float(lengths.mean()), "p90_len": float(lengths.quantile(0.9)),
               "truncation_rate": 1 - float(finished.mean()), "entropy": stats["entropy"], "kl": stats["kl"],
               "clip_low": stats["clip_low"], "clip_high": stats["clip_high"], "ratio_out_first": stats["ratio_out_first"],
               "loss": stats["loss"], "grad_norm": stats["grad_norm"], "zero_var_groups": int(groups[1]),
               "groups_drawn": int(groups[0]), "groups_kept": int(groups[2]), "sample_rounds": len(rounds),
               "skipped": stats["skipped"], "tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9),
               "rollout_s": rollout_s, "update_s": update_s, "lr": opt.param_groups[0]["lr"]}
    samples = [f"=== step {step + 1} | row {i} | reward {float(cat['shaped'].view(-1)[i]):.2f} | "
               f"{int(cat['lengths'].reshape(-1)[i])} tokens | "
               f"{'finished' if cat['finished'].reshape(-1)[i] else 'CUT OFF'} | gold {problems[cat['idx'][i // G]]['answer']}\n"
               f"{tokenizer.decode(rows.prompts[i])}{cat['texts'][i]}\n"
               for i in range(min(cfg.num_samples, len(cat["texts"])))]
    return metrics, samples, pos


def problem_prompt(tokenizer, problem: dict, cfg: Config) -> list[int]:
    """The training prompt of a problem: its own `limit` (when its row has one) or cfg.limit is stated."""
    return build_prompt(tokenizer, problem["problem"], problem.get("limit", cfg.limit), cfg.system_prompt)


# ---- the run -------------------------------------------------------------------------------------------

def _log_metrics_open(out_dir: Path, resume_step: int):
    """Open metrics.jsonl for appending, first cutting it and samples.txt back to the resumed step: metrics
    lines past it (and a line torn by the kill) and samples blocks ("=== step N | ...") past it are
    dropped. Each cut-back file is written under a temporary name and renamed, so a kill keeps it."""
    path = out_dir / "metrics.jsonl"
    if path.exists():
        kept = []
        for ln in path.read_text().split("\n"):
            try:
                if json.loads(ln)["step"] <= resume_step:
                    kept.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # empty, or torn mid-write
        write_text(path, "".join(ln + "\n" for ln in kept))
    samples = out_dir / "samples.txt"
    if samples.exists():
        blocks = re.split(r"(?m)^(?==== step \d+ \|)", samples.read_text())  # each block starts at its header
        write_text(samples, "".join(b for b in blocks
                                    if (m := re.match(r"=== step (\d+) \|", b)) and int(m[1]) <= resume_step))
    return open(path, "a")


def main(cfg: Config, reward_fn=None) -> str:
    """Train with `cfg`; returns out_dir. reward_fn(text, gold, finished) defaults to reward.score. The
    values, the device and the model dir are checked before anything loads; rank 0 holds out_dir's lock
    (checkpoint.lock) for the whole run, so a second run on it is refused."""
    cfg.check()
    d = distributed.init(cfg.device)
    if cfg.prompts_per_step % d.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of world size {d.world}")
    check_dir(cfg.model)
    out_dir = Path(cfg.out_dir)
    if d.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    with ckpt.lock(out_dir) if d.rank == 0 else nullcontext():
        return _run(cfg, reward_fn or reward.score, d, out_dir)


def rollout_slots(cfg: Config, d: Dist) -> tuple[int, str]:
    """KV-cache slots per generate call: cfg.rollout_batch, or for "auto" (with why that many) on CUDA the
    most whose rollout fits in the GPU's free memory by memory.max_rollout_batch (the least over ranks), on
    the CPU all of a rank's rows (the plan counts GPU memory; host memory is not what limits a CPU run)."""
    if cfg.rollout_batch != "auto":
        return cfg.rollout_batch, ""
    rows = cfg.prompts_per_step // d.world * cfg.samples_per_prompt
    if d.device.type != "cuda":
        return rows, f"all {rows} rows of a rank (CPU)"
    distributed.free_memory()  # blocks cached from an earlier stage are free memory too
    free_gb = torch.cuda.mem_get_info(d.device)[0] / memory.GB
    args = ModelArgs.from_hf_config(json.loads((Path(cfg.model) / "config.json").read_text()))
    slots = -d.all_max(-memory.max_rollout_batch(args, cfg, d.world, free_gb))
    if slots < 1:
        raise ValueError(f"rollout_batch='auto': not one KV-cache slot fits in the {free_gb:.1f} GB free on "
                         f"{d.device} (python bench/plan.py CONFIG --gpus {d.world} shows what takes the memory)")
    return slots, f"the most that fit in {free_gb:.1f} GB free by memory.plan (the least over ranks)"


def _run(cfg: Config, reward_fn, d: Dist, out_dir: Path) -> str:
    """main's run, under out_dir's lock."""
    from transformers import AutoTokenizer
    slots, why = rollout_slots(cfg, d)
    cfg = replace(cfg, rollout_batch=slots)  # resolved: printed and saved in checkpoints as it runs
    if d.rank == 0:
        ckpt.clean(out_dir)
        print(json.dumps(asdict(cfg), indent=1), flush=True)
        if why:
            print(f"rollout_batch=auto: {slots} KV-cache slots per generate call, {why}", flush=True)
    if d.world > 1:
        torch.distributed.barrier()

    # data: load, build prompts, drop the ones over max_prompt_tokens
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    problems = load_problems(cfg.train_data)
    prompts = [problem_prompt(tokenizer, p, cfg) for p in problems]
    fits = [i for i, p in enumerate(prompts) if len(p) <= cfg.max_prompt_tokens]
    if d.rank == 0 and len(fits) < len(problems):
        print(f"dropped {len(problems) - len(fits)} of {len(problems)} prompts longer than "
              f"max_prompt_tokens={cfg.max_prompt_tokens}", flush=True)
    problems, prompts = [problems[i] for i in fits], [prompts[i] for i in fits]
    if not problems:
        raise ValueError(f"{cfg.train_data}: no prompt fits in max_prompt_tokens={cfg.max_prompt_tokens}")

    # model, reference, optimizer; resume from the newest complete checkpoint of out_dir
    resume = ckpt.latest(out_dir)
    model = load_model(resume or cfg.model, d, trainable=True, activation_checkpointing=cfg.activation_checkpointing)
    model.source_dir = cfg.model  # tokenizer files come from here: keep_last may delete the resumed checkpoint
    eos = eos_ids(tokenizer, model.args.eos_token_id)
    if d.rank == 0:  # FSDP computes in bf16 on GPUs; one process in fp32
        dtype = torch.bfloat16 if d.world > 1 and d.device.type == "cuda" else torch.float32
        print(f"attention: {attention_backend(d.device, dtype)}", flush=True)
    ref = load_model(cfg.model, d, trainable=False).eval() if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    start = pos = 0
    if resume is not None:
        state = ckpt.load(model, opt, resume, d)
        start = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, i = state["data_position"]
        pos = epoch * len(problems) + i
        if not cfg.dynamic_sampling and pos != start * cfg.prompts_per_step:
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
        metrics, samples, pos = train_step(model, ref, opt, tokenizer, problems, prompts, eos, cfg, d, step, pos,
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
            state = {"step": step + 1, "config": asdict(cfg), "world_size": d.world,
                     "data_position": divmod(pos, len(problems)),  # (epoch, index) of the next problem
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            ckpt.save(model, opt, state, d, out_dir / f"step_{step + 1:06d}", cfg.keep_last)

    if d.rank == 0:
        bar.close()
        log.close()
        if tb is not None:
            tb.close()
        if wb is not None:
            wb.finish()
    del model, ref, opt
    distributed.free_memory()
    return str(out_dir)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    main(load_config(path, sys.argv[2:] if path else sys.argv[1:], Config))
    distributed.cleanup()
