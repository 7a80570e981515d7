"""
The GPU path in one command: is it right, how fast is it, does the memory plan hold? One JSON line per check.

    python bench/gpu.py                      # on one GPU
    python bench/gpu.py --checks parity,speed
    python bench/gpu.py --cpu-smoke          # every check on a tiny random model on the CPU, small sizes (CI)

Without CUDA (and without --cpu-smoke) it prints one line saying so and exits 0. A random model of
DeepSeek-R1-Distill-Qwen-1.5B's shape is built once and saved as a bf16 checkpoint in a temporary
directory; each check then runs in a subprocess of its own with its own timeout, so a hang or a crash
costs that check only (its line says `error`). `ok` is given where the check has a pass/fail criterion.

- env: torch, CUDA, the GPU; whether flash-attn imports and which attention model.py uses (prefill, and
  whether decode steps run flash_attn_with_kvcache); which SDPA kernels (flash, efficient, cudnn, math)
  run a causal bf16 attention.
- parity: our bf16 logits against transformers' Qwen2ForCausalLM in bf16 on the same weights (max and
  mean difference, top-1 agreement), and each against transformers in fp32. ok: our mean error against
  fp32 is at most 1.5x transformers' own.
- greedy: rollout.generate at temperature 0 against transformers' greedy generate: identical rows and the
  mean common prefix. A random model's logits are nearly tied, so two bf16 paths may part at a tie: this
  check is read, not passed.
- logprobs: the sampler's log-probs of the tokens it drew (temperature 1, train.py's) against log-probs
  recomputed from a full forward (`forward_logprobs`: fp32 log-softmax of the logits at the sampling
  temperature): mean and p99 absolute difference, and the fraction of tokens whose importance ratio falls
  outside [0.8, 1.2], i.e. what a 0.2 clip cuts at step 0, where the policy has not moved.
- speed: decode tokens/s at widths 256/128/32/1 (no EOS: every row runs all its tokens), with eager
  steps and with steps replayed from CUDA graphs (capture included), against the HBM roofline from a
  measured device-to-device copy bandwidth: a step reads every weight once (of an untied embedding only a
  row per token) and each row's keys and values so far.
- graphs: generate with decode steps replayed from CUDA graphs against eager steps, greedy and sampled,
  rows of different limits through fewer slots than rows (continuous batching, packing, several
  (width, length) graphs): ok: identical tokens (the same kernels run either way).
- flash_decode: decode attention through flash_attn_with_kvcache (each row reads its own length of the
  cache) against the SDPA decode (the padded prefix, a mask), both bf16 and sampled with one seed, rows as
  in `graphs`: the fraction of identical rows (a rounding difference can move a draw, so it is read), and
  each path's log-probs against an fp32 forward over its own tokens. ok: flash's mean error is at most
  1.5x SDPA's. Without flash-attn (`flash_decode: false`) both sides are SDPA.
- update: train.update on one micro-batch of 4 rows of 768 + 4000 tokens, the model sharded with FSDP2
  on one rank (fp32 master weights, bf16 compute, activation checkpointing, as train.py on several
  GPUs). Two steps; the peak memory of the second (AdamW's states exist by then) against memory.plan's
  update figure for the same shape, without its reserve. ok: the measured peak is within the plan.
- fsdp: FSDP2 on one rank: the sharded forward's logits against the plain bf16 model's, and greedy
  generation on the gathered model (train.unsharded, as the trainer's rollout) against the plain model's.
  ok: the same logits and tokens, and every parameter sharded again afterwards.
FSDP2 runs here at world size 1, where train.py would not shard at all: one GPU is what this has.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memory  # noqa: E402
import plan  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from rollout import generate  # noqa: E402


@dataclass
class Sizes:
    shape: dict  # ModelArgs fields
    device: str
    dtype: torch.dtype
    prompts: int  # parity, greedy, logprobs: this many random prompts of prompt_len tokens
    prompt_len: int
    new_tokens: int
    samples: int  # logprobs: samples per prompt
    widths: tuple  # speed: decode batch widths
    speed_tokens: int
    copy_bytes: int  # speed: the bandwidth copy
    update_rows: int  # update: micro-batch rows of prompt_tokens + limit tokens
    prompt_tokens: int
    limit: int


GPU = Sizes(shape=plan.SHAPES["1.5B"], device="cuda", dtype=torch.bfloat16, prompts=16, prompt_len=64,
            new_tokens=256, samples=4, widths=(256, 128, 32, 1), speed_tokens=512, copy_bytes=2**30,
            update_rows=4, prompt_tokens=768, limit=4000)
SMOKE = Sizes(shape=dict(vocab_size=384, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2), device="cpu", dtype=torch.float32,
              prompts=3, prompt_len=6, new_tokens=8, samples=2, widths=(4, 1), speed_tokens=8, copy_bytes=2**22,
              update_rows=2, prompt_tokens=5, limit=12)


def sync(s: Sizes):
    if s.device == "cuda":
        torch.cuda.synchronize()


def random_prompts(s: Sizes, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s.shape["vocab_size"], (n, length), generator=g).tolist()


def build(ckpt: str, s: Sizes):
    """The random model every check loads: init_weights draws on the CPU, so fill there, then save in bf16."""
    Transformer(ModelArgs(**s.shape)).init_weights(seed=0).to(torch.bfloat16).save_pretrained(ckpt)


def load(ckpt: str, s: Sizes, dtype=None) -> Transformer:
    return Transformer.from_pretrained(ckpt, device=s.device, dtype=dtype or s.dtype).eval()


def hf_model(ckpt: str, s: Sizes, dtype=None):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype or s.dtype).to(s.device).eval()


def forward_logprobs(model: Transformer, seqs: torch.Tensor, start: int, temperature: float) -> torch.Tensor:
    """Log-probs (B, T - start) of seqs[:, start:] from one forward over the whole rows: fp32 log-softmax of
    logits / temperature, gathered at each next token."""
    logits = model(seqs[:, :-1])[:, start - 1:].float() / temperature  # position t predicts token t + 1
    return logits.log_softmax(-1).gather(-1, seqs[:, start:, None])[..., 0]


# ---- the checks: each returns a dict, printed as one JSON line -----------------------------------------

def check_env(ckpt: str, s: Sizes) -> dict:
    import model as model_module
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": s.device}
    if s.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}")
    try:
        import flash_attn
        out["flash_attn"] = flash_attn.__version__
    except ImportError as e:
        out["flash_attn"] = f"not importable: {e}"
    out["model_attention"] = "flash-attn" if model_module.flash_attn_func is not None and s.device == "cuda" \
        else "torch SDPA"
    out["flash_decode"] = model_module.flash_decode(torch.device(s.device), s.dtype)
    q, k, v = (torch.randn(2, 12, 256, 128, device=s.device, dtype=s.dtype) for _ in range(3))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out[f"sdpa_{backend.name.lower()}"] = "runs"
        except RuntimeError as e:
            out[f"sdpa_{backend.name.lower()}"] = str(e).splitlines()[0][:120]
    return out


def check_parity(ckpt: str, s: Sizes) -> dict:
    ids = torch.tensor(random_prompts(s, s.prompts, s.prompt_len), device=s.device)
    with torch.no_grad():
        truth = hf_model(ckpt, s, torch.float32)(ids).logits.float()
        ours = load(ckpt, s)(ids).float()
        theirs = hf_model(ckpt, s)(ids).logits.float()
    ours_err, theirs_err = (ours - truth).abs().mean().item(), (theirs - truth).abs().mean().item()
    return {"tokens": ids.numel(), "max_abs_diff": (ours - theirs).abs().max().item(),
            "mean_abs_diff": (ours - theirs).abs().mean().item(),
            "top1_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "ours_vs_fp32": ours_err, "transformers_vs_fp32": theirs_err,
            "ok": ours_err <= 1.5 * theirs_err + 1e-6}


def check_greedy(ckpt: str, s: Sizes) -> dict:
    prompts = random_prompts(s, s.prompts, s.prompt_len, seed=1)  # one length: no padding on either side
    ours = generate(load(ckpt, s), prompts, n=1, max_new_tokens=s.new_tokens, temperature=0, eos_ids=(),
                    max_batch=len(prompts)).tokens
    with torch.no_grad():
        theirs = hf_model(ckpt, s).generate(input_ids=torch.tensor(prompts, device=s.device), do_sample=False,
                                            max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                                            eos_token_id=None, pad_token_id=0)[:, s.prompt_len:].cpu()
    same = (ours == theirs).long().cumprod(1).sum(1)  # common prefix per row
    return {"rows": len(prompts), "new_tokens": s.new_tokens,
            "rows_identical": (same == s.new_tokens).float().mean().item(),
            "mean_common_prefix": same.float().mean().item() / s.new_tokens}


def check_logprobs(ckpt: str, s: Sizes) -> dict:
    model = load(ckpt, s)
    prompts = random_prompts(s, s.prompts, s.prompt_len, seed=2)
    ro = generate(model, prompts, n=s.samples, max_new_tokens=s.new_tokens, temperature=1.0, eos_ids=(), seed=0,
                  max_batch=len(prompts) * s.samples)
    seqs = torch.cat([torch.tensor(prompts).repeat_interleave(s.samples, 0), ro.tokens], 1).to(s.device)
    with torch.no_grad():  # a few rows at a time: (rows, T, V) fp32 logits
        full = torch.cat([forward_logprobs(model, seqs[i:i + 4], s.prompt_len, 1.0).cpu()
                          for i in range(0, len(seqs), 4)])
    diff = full - ro.logprobs
    return {"tokens": diff.numel(), "mean_abs_diff": diff.abs().mean().item(),
            "p99_abs_diff": diff.abs().flatten().quantile(0.99).item(),
            "clip_fraction_at_0.2": ((diff.exp() - 1).abs() > 0.2).float().mean().item()}


def check_speed(ckpt: str, s: Sizes) -> dict:
    model = load(ckpt, s)
    args = model.args
    x = torch.empty(s.copy_bytes // 2, dtype=torch.bfloat16, device=s.device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(s)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(s)
    bandwidth = 10 * 2 * s.copy_bytes / (time.perf_counter() - t)  # bytes read + written per second
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       if args.tie_word_embeddings or not name.startswith("embed_tokens"))
    kv_token = memory.kv_cache_bytes(args, 1, 1, next(model.parameters()).element_size())
    generate(model, random_prompts(s, 2, s.prompt_len), n=1, max_new_tokens=4, eos_ids=(), cuda_graphs=False)  # warm-up
    rows = []
    for w in s.widths:
        prompts = random_prompts(s, w, s.prompt_len, seed=w)
        mean_ctx = s.prompt_len + s.speed_tokens / 2  # rows grow linearly over the run
        roofline = w * bandwidth / (weight_bytes + w * mean_ctx * kv_token)
        out = {"width": w, "roofline_tok_s": round(roofline, 1)}
        for name, graphs in (("eager", False), ("graphed", True)):
            if graphs and s.device != "cuda":
                continue
            sync(s)
            t = time.perf_counter()
            generate(model, prompts, n=1, max_new_tokens=s.speed_tokens, eos_ids=(), max_batch=w, cuda_graphs=graphs)
            sync(s)
            tok_s = w * s.speed_tokens / (time.perf_counter() - t)
            out.update({f"{name}_tok_s": round(tok_s, 1), f"{name}_fraction": round(tok_s / roofline, 3)})
        rows.append(out)
    return {"bandwidth_GBs": round(bandwidth / 1e9, 1), "new_tokens": s.speed_tokens, "widths": rows}


def batching_case(s: Sizes):
    """Prompts, per-prompt limits and a slot count that exercise continuous batching and packing: four
    limits from new_tokens down to a quarter of it, half as many slots as rows."""
    prompts = random_prompts(s, s.prompts, s.prompt_len, seed=4)
    limits = [max(1, s.new_tokens // (1 + i % 4)) for i in range(s.prompts)]
    return prompts, dict(n=s.samples, max_new_tokens=limits, eos_ids=(), max_batch=s.prompts * s.samples // 2)


def check_graphs(ckpt: str, s: Sizes) -> dict:
    model = load(ckpt, s)
    graphs = s.device == "cuda"  # off the GPU both sides run eagerly: the check's code still runs
    prompts, kw = batching_case(s)
    out = {"graphed": graphs}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        times, tokens = [], []
        for cuda_graphs in (False, graphs):
            sync(s)
            t = time.perf_counter()
            ro = generate(model, prompts, temperature=temperature, seed=0, cuda_graphs=cuda_graphs, **kw)
            tokens.append(ro.tokens)
            sync(s)
            times.append(time.perf_counter() - t)
        out.update({f"{name}_tokens_equal": torch.equal(*tokens), f"{name}_eager_s": round(times[0], 2),
                    f"{name}_graphed_s": round(times[1], 2)})
    return {**out, "ok": out["greedy_tokens_equal"] and out["sampled_tokens_equal"]}


def check_flash_decode(ckpt: str, s: Sizes) -> dict:
    import model as model_module
    model, reference = load(ckpt, s), load(ckpt, s, torch.float32)
    prompts, kw = batching_case(s)
    flash = model_module.flash_decode(torch.device(s.device), s.dtype)
    kernel = model_module.flash_attn_with_kvcache
    runs = {}
    try:
        for name in ("flash", "sdpa"):
            model_module.flash_attn_with_kvcache = kernel if name == "flash" else None  # None: KVCache.flash is off
            runs[name] = generate(model, prompts, temperature=1.0, seed=0, **kw)
    finally:
        model_module.flash_attn_with_kvcache = kernel
    out = {"flash_decode": flash, "rows": len(runs["flash"].lengths),
           "rows_identical": (runs["flash"].tokens == runs["sdpa"].tokens).all(1).float().mean().item()}
    for name, ro in runs.items():
        seqs = torch.cat([torch.tensor(prompts).repeat_interleave(s.samples, 0), ro.tokens], 1).to(s.device)
        with torch.no_grad():  # a few rows at a time: (rows, T, V) fp32 logits
            full = torch.cat([forward_logprobs(reference, seqs[i:i + 4], s.prompt_len, 1.0).cpu()
                              for i in range(0, len(seqs), 4)])
        valid = torch.arange(ro.tokens.size(1)) < ro.lengths[:, None]
        out[f"{name}_vs_fp32"] = (full - ro.logprobs).abs()[valid].mean().item()
    return {**out, "ok": out["flash_vs_fp32"] <= 1.5 * out["sdpa_vs_fp32"] + 1e-6}


def fsdp_group(ckpt: str, s: Sizes):
    """A process group of one rank for FSDP2 (nccl on CUDA, gloo on the CPU), met at a file beside the
    checkpoint; the check that makes it destroys it."""
    import torch.distributed as dist
    fd, meet = tempfile.mkstemp(prefix=".group_", dir=ckpt)  # an empty file: a fresh store
    os.close(fd)
    dist.init_process_group("nccl" if s.device == "cuda" else "gloo", init_method=f"file://{meet}", rank=0,
                            world_size=1)


def shard(model: Transformer, s: Sizes) -> Transformer:
    """train.load_model's FSDP2 recipe (each block, then the root; bf16 compute and fp32 gradient reduction
    on CUDA) applied at world size 1."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if s.device == "cuda" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def check_update(ckpt: str, s: Sizes) -> dict:
    import torch.distributed as dist
    import train
    from distributed import Dist
    fsdp_group(ckpt, s)
    try:
        d = Dist(0, 1, torch.device(s.device))
        model = shard(train.load_model(ckpt, d, trainable=True, activation_checkpointing=True), s)
        cfg = train.Config(micro_batch_size=s.update_rows, max_prompt_tokens=s.prompt_tokens, limit=s.limit,
                           kl_coef=0.0, activation_checkpointing=True)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(0)
        rows = train.Rows(prompts=random_prompts(s, s.update_rows, s.prompt_tokens),
                          tokens=[torch.randint(0, s.shape["vocab_size"], (s.limit,), generator=g)
                                  for _ in range(s.update_rows)],
                          old_logp=[torch.full((s.limit,), -5.0) for _ in range(s.update_rows)],
                          adv=torch.randn(s.update_rows, generator=g))
        before = model.layers[0].mlp.up_proj.weight.detach().to_local().clone()
        stats = []
        for step in range(2):
            if s.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            stats.append(train.update(model, None, opt, rows, list(range(s.update_rows)), cfg, d, step))
            sync(s)
            seconds = time.perf_counter() - t
        moved = not torch.equal(before, model.layers[0].mlp.up_proj.weight.detach().to_local())
    finally:
        dist.destroy_process_group()
    planned = memory.plan(model.args, cfg, gpus=1, gpu_mem_gb=0, fsdp=True)["update"]
    out = {"rows": s.update_rows, "tokens_per_row": s.prompt_tokens + s.limit, "step_seconds": round(seconds, 2),
           "loss": stats[-1]["loss"], "grad_norm": stats[-1]["grad_norm"], "weights_moved": moved,
           "planned_gb": round(planned["total"] - planned["reserve"], 2),
           "planned": {k: round(v, 2) for k, v in planned.items() if k not in ("total", "fits", "reserve")}}
    ok = moved and all(st["skipped"] == 0 for st in stats)
    if s.device == "cuda":
        out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        ok = ok and out["peak_gb"] <= out["planned_gb"]
    return {**out, "ok": ok}


def check_fsdp(ckpt: str, s: Sizes) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import train
    plain = load(ckpt, s)
    ids = torch.tensor(random_prompts(s, s.prompts, s.prompt_len, seed=3), device=s.device)
    greedy = dict(n=1, max_new_tokens=s.new_tokens, temperature=0, eos_ids=(), max_batch=s.prompts)
    with torch.no_grad():
        want = plain(ids).float()
    want_tokens = generate(plain, ids.tolist(), **greedy).tokens
    fsdp_group(ckpt, s)
    try:
        model = shard(load(ckpt, s, torch.float32), s)  # fp32 master weights; the checkpoint's are bf16-exact
        with torch.no_grad():
            got = model(ids).float()
        with train.unsharded(model) as gathered:
            tokens = generate(gathered, ids.tolist(), **greedy).tokens
        resharded = all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        dist.destroy_process_group()
    diff = (got - want).abs().max().item()
    same_tokens = torch.equal(tokens, want_tokens)
    return {"max_abs_logit_diff": diff, "greedy_tokens_equal": same_tokens, "resharded_after": resharded,
            "ok": diff <= 1e-3 * want.abs().max().item() and same_tokens and resharded}


CHECKS = {  # name: (function, timeout in seconds on a GPU)
    "env": (check_env, 120),
    "parity": (check_parity, 300),
    "greedy": (check_greedy, 300),
    "logprobs": (check_logprobs, 300),
    "speed": (check_speed, 600),
    "graphs": (check_graphs, 300),
    "flash_decode": (check_flash_decode, 300),
    "update": (check_update, 420),
    "fsdp": (check_fsdp, 300),
}


def run(name: str, ckpt: str, smoke: bool, timeout: float) -> dict:
    """One check in a subprocess of its own: its JSON line, or a line saying how it failed."""
    cmd = [sys.executable, __file__, "--one", name, "--ckpt", ckpt] + (["--cpu-smoke"] if smoke else [])
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"check": name, "ok": False, "error": f"timed out after {timeout:g} s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}, no output"])[-1]
        return {"check": name, "ok": False, "error": err, "seconds": round(time.perf_counter() - t, 1)}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma-separated, from: " + ", ".join(CHECKS))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, small sizes, on the CPU")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one check in this process (what `run` calls)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = ap.parse_args()
    s = SMOKE if a.cpu_smoke else GPU
    if a.one:
        torch.manual_seed(0)
        t = time.perf_counter()
        out = CHECKS[a.one][0](a.ckpt, s)
        print(json.dumps({"check": a.one, **out, "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        return
    if not a.cpu_smoke and not torch.cuda.is_available():
        print(json.dumps({"check": "gpu", "skipped": f"no CUDA device (torch {torch.__version__}); "
                                                     "--cpu-smoke runs the checks on the CPU"}))
        return
    names = a.checks.split(",")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        sys.exit(f"--checks: unknown {unknown}; choose from {', '.join(CHECKS)}")
    with tempfile.TemporaryDirectory() as ckpt:
        build(ckpt, s)
        for name in names:
            timeout = CHECKS[name][1] / (5 if a.cpu_smoke else 1)
            print(json.dumps(run(name, ckpt, a.cpu_smoke, timeout)), flush=True)


if __name__ == "__main__":
    main()
