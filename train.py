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
- Rollouts run on the unsharded model (every FSDP module unsharded once, kept so through decoding):
  ranks whose rows stop at different lengths never wait for each other in a collective.
- The loss is summed over completion tokens and divided by the step's completion tokens on all ranks
  (token-mean), times the world size because FSDP averages gradients; every rank runs the same number
  of micro-batches (zero-weight dummy rows), so the collectives pair up.
- Samples are seeded by (seed, step, the prompt's place in the step's batch), the data order by (seed,
  epoch): a run does not depend on the world size, and a resumed run is the run that was killed.
- One process on a GPU trains in fp32 (TF32 matmuls); under torchrun FSDP2 keeps fp32 master weights
  and computes in bf16. A non-finite loss or grad norm skips the optimizer step (logged as `skipped`).
Simplifications: the full model is loaded on every rank before sharding; every micro-batch's backward
reduce-scatters; rollouts use our own sampler, not vLLM.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import checkpoint as ckpt
import distributed
import reward
from config import check, load_config
from data import DATA_DIR, SYSTEM_PROMPT, batch_indices, build_prompt, eos_ids, load_problems, seed_for
from distributed import Dist
from model import Transformer
from rollout import Rollout, generate


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
        check(self.temperature > 0, "temperature", self.temperature, "training samples: give temperature > 0")


# ---- the loss ----------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float):
    """rewards (P, G) -> advantages (P, G), and which groups have zero variance (P,) bool.
    (r - group mean) / (group std + eps), the unbiased std as veRL; std_normalize=False gives plain
    r - mean, as Dr. GRPO argues."""
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
        g = torch.Generator().manual_seed(seed_for(cfg.seed, step, 1_000 * epoch + d.rank))
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
                lp_kw = dict(targets=targets, temperature=cfg.temperature, chunk=cfg.logprob_chunk)
                ref_logp = None
                if ref is not None:
                    with torch.no_grad():
                        ref_logp, _ = ref(inputs, **lp_kw)
                logp, entropy = model(inputs, **lp_kw, entropy_grad=cfg.entropy_coef > 0)
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


def train_step(model, ref, opt, tokenizer, problems, prompts, eos: list[int], cfg: Config, d: Dist, step: int,
               reward_fn) -> tuple[dict, list[str]]:
    """One rollout batch and its update. Returns metrics and a few decoded samples (rank 0's)."""
    G = cfg.samples_per_prompt
    idx = batch_indices(len(problems), cfg.prompts_per_step, cfg.seed, step)
    per_rank = cfg.prompts_per_step // d.world
    mine = idx[d.rank * per_rank:(d.rank + 1) * per_rank]
    seeds = [seed_for(cfg.seed, step, d.rank * per_rank + j) for j in range(len(mine))]  # by place in batch

    # 1. rollout on the unsharded model
    t0 = time.perf_counter()
    with unsharded(model), torch.no_grad():
        ro = generate(model, [prompts[k] for k in mine], n=G, max_new_tokens=cfg.limit, temperature=cfg.temperature,
                      eos_ids=eos, seed=seeds, max_batch=cfg.rollout_batch)
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


# ---- the run -------------------------------------------------------------------------------------------

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
    cfg.check()
    d = distributed.init(cfg.device)
    if cfg.prompts_per_step % d.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of world size {d.world}")
    out_dir = Path(cfg.out_dir)
    if d.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean(out_dir)
        print(json.dumps(asdict(cfg), indent=1), flush=True)
    if d.world > 1:
        torch.distributed.barrier()

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

    # model, reference, optimizer; resume from the newest complete checkpoint of out_dir
    resume = ckpt.latest(out_dir)
    model = load_model(resume or cfg.model, d, trainable=True, activation_checkpointing=cfg.activation_checkpointing)
    model.source_dir = cfg.model  # tokenizer files come from here: keep_last may delete the resumed checkpoint
    eos = eos_ids(tokenizer, model.args.eos_token_id)
    ref = load_model(cfg.model, d, trainable=False).eval() if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        state = ckpt.load(model, opt, resume, d)
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
        metrics, samples = train_step(model, ref, opt, tokenizer, problems, prompts, eos, cfg, d, step, reward_fn)
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
                     "data_position": divmod((step + 1) * cfg.prompts_per_step, len(problems)),  # (epoch, index)
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
    return str(out_dir)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    main(load_config(path, sys.argv[2:] if path else sys.argv[1:], Config))
    distributed.cleanup()
