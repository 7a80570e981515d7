"""
Memory per GPU of a training config's rollout and update, from the model's shape alone: what train.py
resolves `rollout_batch = "auto"` with at start, and what `python bench/plan.py` prints before a run.

    p = memory.plan(args, cfg, gpus=8, gpu_mem_gb=80)       # GB per item, totals and `fits`, rollout and update
    memory.max_rollout_batch(args, cfg, gpus=8, gpu_mem_gb=80)  # the most KV-cache slots whose rollout fits

What is counted, following train.py, rollout.py and model.py (figures are rank 0's, whose FSDP shards are
the largest: torch.chunk gives each rank ceil(rows / gpus) rows of every parameter):
- Several GPUs (FSDP2): fp32 master weights, fp32 gradients, AdamW's two fp32 states, all sharded; the
  reference in bf16, sharded, plus its root module (embedding, head, final norm), which FSDP2 keeps
  gathered after a forward. The rollout gathers the whole policy in bf16 and decodes into a bf16 KV cache.
  One GPU: train.py runs one process in fp32 without FSDP, so everything is whole and fp32.
- Rollout: the KV cache (model.KVCache: k and v of layers x slots x kv heads x (max_prompt_tokens + limit)
  x head dim), the output tables, with CUDA graphs their pool (one decode step's tensors, kept), and the
  largest of three passing needs: a prefill (its keys/values and MLP activations, at most
  rollout.PREFILL_TOKENS tokens at once), the copy the sampler makes when it packs rows into the front
  slots (half the slots of k or of v), and a decode step's logits.
- Update: micro_batch_size rows of max_prompt_tokens + limit tokens. Backward at its largest holds the
  activations kept for it (each block's input under activation checkpointing, else every block's saved
  tensors), the root's gathered bf16 weights and the head's gradient, two gathered blocks (FSDP2
  prefetches one) and one block's gradient with its fp32 copy for the reduce-scatter, and the larger of
  one block's recomputed activations with their gradients, or one log-prob chunk (model.forward with
  targets runs the final norm, the head and the fp32 log-softmax on logprob_chunk positions of a row at a
  time: logits, fp32 logits, probabilities and the gradients of the logits). Or, if larger, the end of
  backward: the root's gradients in bf16 plus their fp32 copy.
- RESERVE_GB in both, for the CUDA context, NCCL's buffers and allocator fragmentation.
Weights, shards, gradients, optimizer states and the KV cache are exact (tests/test_plan.py builds the
real tensors); activations are counted from model.Block.forward, tensor by tensor, as what autograd
saves per token. bench/gpu.py measures a real update's peak against this plan.
"""

import dataclasses
import math

import torch

from model import ModelArgs, Transformer
from rollout import PREFILL_TOKENS

GB = 1e9
RESERVE_GB = 2.0  # an allowance for what PyTorch does not allocate itself, not a measurement
FP32 = 4


def kv_cache_bytes(args: ModelArgs, slots: int, positions: int, dtype_bytes: int) -> int:
    """model.KVCache(args, slots, positions): k and v, each (n_layer, slots, n_kv, positions, head_dim)."""
    return 2 * args.num_hidden_layers * slots * args.num_key_value_heads * positions * args.head_dim * dtype_bytes


def block_saved_bytes(args: ModelArgs, tokens: int, dtype_bytes: int) -> int:
    """What autograd saves for backward in one model.Block forward over `tokens` tokens: per RMSNorm its fp32
    input, rsqrt, normalised and output tensors; RoPE's cos/sin cast to the compute dtype (q and k: four);
    q and k after RoPE, v, the attention output (the o_proj input is a view of it) and its fp32
    log-sum-exp per head; the four (T, intermediate) MLP tensors (gate, silu, up, product)."""
    H, c = args.hidden_size, dtype_bytes
    kv = args.num_key_value_heads * args.head_dim
    per_token = (2 * (FP32 * H + FP32 + 2 * c * H) + 4 * c * args.head_dim + c * (2 * H + 2 * kv)
                 + FP32 * args.num_attention_heads + 4 * c * args.intermediate_size)
    return tokens * per_token


def param_numels(args: ModelArgs, gpus: int) -> dict:
    """Parameter counts: whole model, rank 0's FSDP shard of it, the root module (all but the blocks) and one block."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(args).named_parameters()}
    return {"all": sum(math.prod(s) for s in shapes.values()),
            "shard": sum(-(-s[0] // gpus) * math.prod(s[1:]) for s in shapes.values()),
            "root": sum(math.prod(s) for n, s in shapes.items() if not n.startswith("layers.")),
            "block": sum(math.prod(s) for n, s in shapes.items() if n.startswith("layers.0."))}


def plan(args: ModelArgs, cfg, gpus: int, gpu_mem_gb: float, fsdp: bool | None = None) -> dict:
    """Per-GPU memory in GB of the rollout and the update of `cfg` (a train.Config) on `gpus` GPUs of
    `gpu_mem_gb` each.
    fsdp: None follows train.py (FSDP2 with bf16 compute when gpus > 1; one process in fp32 otherwise)."""
    fsdp = gpus > 1 if fsdp is None else fsdp
    c = 2 if fsdp else FP32  # bytes of the compute dtype
    n = param_numels(args, gpus if fsdp else 1)
    H, I, V, L = args.hidden_size, args.intermediate_size, args.vocab_size, args.num_hidden_layers
    S = cfg.max_prompt_tokens + cfg.limit  # the longest sequence: a cache slot, a row of the update
    rows = cfg.prompts_per_step // gpus * cfg.samples_per_prompt
    B = min(cfg.rollout_batch, rows)
    weights, grads, optimizer = FP32 * n["shard"], FP32 * n["shard"], 2 * FP32 * n["shard"]
    reference = 0 if cfg.kl_coef <= 0 else c * n["shard"] + (c * n["root"] if fsdp else 0)

    # rollout: weights gathered in bf16, the KV cache, and the largest passing need
    held = (-(-B // cfg.samples_per_prompt) + 1) * cfg.max_prompt_tokens  # prompt tokens prefilled for one admission
    prefill = held * kv_cache_bytes(args, 1, 1, c) + min(held, PREFILL_TOKENS) * c * (3 * I + 4 * H)
    pack_copy = kv_cache_bytes(args, B // 2, S, c) // 2
    decode = B * (V * (c + FP32) + 3 * I * c)  # logits, their fp32 copy, MLP intermediates
    graph_pool = decode if cfg.cuda_graphs is not False else 0  # the graphs keep a decode step's tensors all along
    ro = dict(weights=weights, optimizer=optimizer, reference=reference, gathered=c * n["all"] if fsdp else 0,
              kv_cache=kv_cache_bytes(args, B, S, c), tables=(rows + 1) * cfg.limit * 16,  # int64 + 2 fp32
              graph_pool=graph_pool, prefill=prefill, pack_copy=pack_copy, decode=decode)
    ro_total = sum(ro[k] for k in ("weights", "optimizer", "reference", "gathered", "kv_cache", "tables",
                                   "graph_pool")) + max(prefill, pack_copy, decode)

    # update: one micro-batch's forward and backward
    tok = cfg.micro_batch_size * S
    block = block_saved_bytes(args, tok, c)
    block_grads = tok * c * (3 * I + 4 * H)  # gradients alive while a block's backward runs
    if cfg.activation_checkpointing:
        kept, recompute = L * tok * c * H + tok * 2 * FP32 * args.head_dim, block + block_grads  # inputs, cos/sin
    else:
        kept, recompute = L * block, block_grads
    kept += tok * c * H  # the last block's output: the head and final norm run per chunk of it
    logprob = min(cfg.logprob_chunk, S) * V * (2 * c + 3 * FP32)  # chunks lie within one row
    fsdp_buffers = c * (n["root"] + V * H + 2 * n["block"]) + (c + FP32) * n["block"] if fsdp else 0
    end_of_backward = (2 * c + FP32) * n["root"] if fsdp else 0
    up = dict(weights=weights, grads=grads, optimizer=optimizer, reference=reference, fsdp_buffers=fsdp_buffers,
              activations=kept, block_backward=recompute, logprob_peak=logprob, end_of_backward=end_of_backward)
    up_total = weights + grads + optimizer + reference + max(fsdp_buffers + kept + max(recompute, logprob),
                                                             end_of_backward)

    out = {"gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "fsdp": fsdp, "params_B": n["all"] / 1e9,
           "rows_per_gpu": rows, "rollout_batch": B, "seq_len": S, "micro_batch_size": cfg.micro_batch_size}
    for name, parts, total in (("rollout", ro, ro_total), ("update", up, up_total)):
        out[name] = {k: v / GB for k, v in parts.items()}
        out[name].update(reserve=RESERVE_GB, total=total / GB + RESERVE_GB, fits=total / GB + RESERVE_GB <= gpu_mem_gb)
    return out


def max_rollout_batch(args: ModelArgs, cfg, gpus: int, gpu_mem_gb: float,
                      fsdp: bool | None = None) -> int:
    """The largest rollout_batch (KV-cache slots) whose rollout fits, at most the rank's rows; 0 if none does."""
    lo, hi = 0, cfg.prompts_per_step // gpus * cfg.samples_per_prompt
    while lo < hi:  # the rollout's memory grows with the slots: bisect
        mid = (lo + hi + 1) // 2
        if plan(args, dataclasses.replace(cfg, rollout_batch=mid), gpus, gpu_mem_gb, fsdp)["rollout"]["fits"]:
            lo = mid
        else:
            hi = mid - 1
    return lo
