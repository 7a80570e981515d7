"""
Benchmark: rollout.generate against transformers' Qwen2ForCausalLM.generate on the same weights.

    python bench/rollout.py                      # CPU, 2 threads: the toy-sized model and a ~40M Qwen2 shape
    python bench/rollout.py --prompts 8          # fewer prompts if the 40M run is too slow (both sides equal)
    python bench/rollout.py --gpu                # + a 1.5B-shaped bf16 run against the memory-bandwidth roofline

Equal work on both sides: the same random weights (ours saved with save_pretrained, loaded by
transformers in fp32), the same left/right-padded prompts, 8 samples per prompt, sampling at
temperature 1 with no top-k/top-p, and no EOS, so every row runs the full max_new_tokens. transformers
prefills each prompt n times (num_return_sequences expands the input first); we prefill it once, which
is part of what is measured, and so is the way our linear layers multiply on the CPU: from a copy of the
weights packed for oneDNN (model.packed_weights), where transformers' F.linear calls MKL.
Tokens/s counts generated tokens only, wall clock, after one warm-up call per side (best of --repeats
alternating runs). Prints one JSON line per model.

OpenMP's wait policy is left as the environment has it (both sides share it; the JSON says which). The
default spins between parallel regions, which is fastest on an idle machine; on a machine shared with
other jobs the spinning threads fight them, and OMP_WAIT_POLICY=PASSIVE is the setting to measure with
(bench/README.md has the figures).

The GPU run (skipped cleanly without CUDA) times ours on a DeepSeek-R1-Distill-Qwen-1.5B-shaped model
in bf16 and compares it with the memory-bandwidth roofline: each decode step must read every weight once
plus every live row's keys/values, so tokens/s <= rows * bandwidth / (weight bytes + KV bytes read per
step); an untied embedding is not counted (a step reads one row of it per token). Bandwidth is measured with a large device-to-device copy (read + write bytes / time).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, Transformer  # noqa: E402
from rollout import generate  # noqa: E402

SHAPES = {  # Qwen2 family shapes; GQA 2:1 or more, tied head like the small Qwen2.5/R1-Distill models
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "40M": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e4),
}


def make_prompts(n_prompts, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 49, (n_prompts,), generator=g).tolist()
    return [torch.randint(10, vocab, (k,), generator=g).tolist() for k in lens]


def ours(model, prompts, n, new_tokens, compile=False):
    t = time.perf_counter()
    ro = generate(model, prompts, n=n, max_new_tokens=new_tokens, temperature=1.0, eos_ids=(), seed=0,
                  max_batch=len(prompts) * n, compile=compile)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert int(ro.lengths.sum()) == len(prompts) * n * new_tokens
    return int(ro.lengths.sum()) / dt


def theirs(hf, prompts, n, new_tokens):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left padding, as HF decoding wants
    attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape == (len(prompts) * n, T + new_tokens)
    return len(prompts) * n * new_tokens / dt


def cpu_run(name, n_prompts, n, new_tokens, compile, repeats):
    from transformers import Qwen2ForCausalLM

    model = Transformer(ModelArgs(**SHAPES[name])).init_weights(seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompts = make_prompts(n_prompts, model.args.vocab_size)
    # warm-up; compiling needs the timed run's shapes (batch widths, cache prefix lengths), eager does not
    ours(model, *((prompts, n, new_tokens) if compile else (prompts[:2], 2, 8)), compile)
    theirs(hf, prompts[:2], 2, 8)
    a = b = 0.0
    for _ in range(repeats):  # alternate the two sides so that load from other processes hits both; keep the best
        a = max(a, ours(model, prompts, n, new_tokens, compile))
        b = max(b, theirs(hf, prompts, n, new_tokens))
    params = sum(p.numel() for p in model.parameters())
    return dict(model=name, params_M=round(params / 1e6, 1), device="cpu", threads=torch.get_num_threads(),
                prompts=n_prompts, samples=n, new_tokens=new_tokens, compile=compile, repeats=repeats,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                ours_tok_s=round(a, 1), transformers_tok_s=round(b, 1), ratio=round(a / b, 2))


def gpu_run(n_prompts, n, new_tokens):
    if not torch.cuda.is_available():
        return dict(model="1.5B", device="cuda", skipped="no CUDA device")
    args = ModelArgs(**SHAPES["1.5B"])
    # init_weights draws from a CPU generator, so build and fill on the CPU (6 GB before the bf16 cast), then move
    model = Transformer(args).to(torch.bfloat16).init_weights(seed=0).to("cuda").eval()
    prompts = make_prompts(n_prompts, args.vocab_size)
    ours(model, prompts[:2], 2, 8)
    tok_s = ours(model, prompts, n, new_tokens)
    # bandwidth: copy 1 GiB on the device, count bytes read + written
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() * 2 / (time.perf_counter() - t)
    rows = n_prompts * n
    # a step reads every weight once, except an untied embedding, of which it reads one row per token
    weight_bytes = sum(p.numel() for name, p in model.named_parameters()
                       if args.tie_word_embeddings or not name.startswith("embed_tokens")) * 2
    kv_per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 2  # k and v, bf16
    mean_ctx = sum(len(p) for p in prompts) / len(prompts) + new_tokens / 2  # rows grow linearly over the run
    roofline = rows * bw / (weight_bytes + rows * mean_ctx * kv_per_token)
    return dict(model="1.5B", device=torch.cuda.get_device_name(), dtype="bf16", prompts=n_prompts, samples=n,
                new_tokens=new_tokens, ours_tok_s=round(tok_s, 1), bandwidth_GBs=round(bw / 1e9, 1),
                roofline_tok_s=round(roofline, 1), fraction_of_roofline=round(tok_s / roofline, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--models", default="tiny,40M", help="comma-separated CPU shapes from SHAPES")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternating timed runs per side; the best is kept")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    ap.add_argument("--gpu", action="store_true", help="also run the 1.5B bf16 roofline comparison on CUDA")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.models.split(","):
        print(json.dumps(cpu_run(name, a.prompts, a.samples, a.new_tokens, a.compile, a.repeats)), flush=True)
    if a.gpu:
        print(json.dumps(gpu_run(a.prompts, a.samples, 1024)), flush=True)


if __name__ == "__main__":
    main()
