"""Batched sampling from a `model.Transformer` with a static KV cache and ThinkPrune's hard length cutoff.

    from rollout import generate
    ro = generate(model, prompts, n=8, max_new_tokens=4096, temperature=0.6, top_p=0.95, seed=step)
    ro.tokens[i, :ro.lengths[i]]  # completion i, EOS included; its prompt is prompts[ro.prompt_index[i]]

Rows are prompt-major: row i is sample i % n of prompt i // n (a GRPO group is n consecutive rows).
A row stops at the first EOS (kept: learning when to stop is the method) or after exactly `max_new_tokens`
tokens without one: the hard cutoff, `finished=False`.

How it works (the numbered steps in `generate`):
1. One static `KVCache` of `max_batch` slots (gpt-fast style: fixed shapes).
2. Admission: a free slot takes the next waiting row. Each prompt is prefilled once, its keys/values
   copied into the slots of its n samples, each of which draws its own first token.
3. Once nothing waits, running rows are packed into the front slots whenever they fit in half the
   width, and steps run on that many slots only (a power of two).
4. Decode (`decode`): each slot in use feeds its last token; attention reads the cache prefix in use,
   rounded up (`attend_length`: at most 1/8 padding, few distinct lengths), or with flash-attn each
   row's own length. It only reads and writes buffers made once per call and never syncs, so on CUDA a
   graph captured per (width, length) replays it (`cuda_graphs`, dropped when generate returns).
5. A row that stops frees its slot for the next waiting row at once (continuous batching).

Randomness: token t of row i is drawn by inverse-CDF sampling with uniform u[i, t] from a table drawn
once per call from `seed` (or one generator per prompt when `seed` is a list): a row's randomness
belongs to (seed, prompt, sample, step), not to the slot it ran in, so any `max_batch` gives the same
samples (up to float rounding) and a prompt's samples do not depend on the prompts beside it.

Sampling distribution: fp32 logits / temperature, then top-k, then top-p (the smallest set of most
likely tokens whose mass reaches top_p). `logprobs` are under exactly that distribution: the "old"
policy of the trainer's importance ratio. temperature=0 is greedy, with the plain softmax's logprobs.
On the CPU in fp32 the linear layers run from oneDNN-packed weights (model.py's fenced speed paths);
`compile=True` compiles the decode step and its sampling. One host sync per step: did any row stop?
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache, Transformer, packed_weights

PREFIX_ROUND = 16  # attend over the cache prefix rounded up to at least this many positions
PREFILL_TOKENS = 2**15  # max padded tokens in one prefill forward (bounds its activations and cache)
CDF_BLOCK = 128  # columns per block of the two-level inverse-CDF search in `sample`


@dataclass
class Rollout:
    tokens: torch.Tensor  # (N, Lmax) long, completion tokens (EOS included), right-padded with pad_id
    logprobs: torch.Tensor  # (N, Lmax) float32, log-prob of each sampled token (0 at padding)
    lengths: torch.Tensor  # (N,) long, completion tokens per row (EOS counted)
    finished: torch.Tensor  # (N,) bool, an EOS came within max_new_tokens
    prompt_index: torch.Tensor  # (N,) long, row i continues prompts[prompt_index[i]] = i // n


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           overwrite: bool = False):
    """One token per row by inverse-CDF sampling with the given uniforms.
    logits (B, V) fp32, u (B,) in [0, 1) -> tokens (B,) long, logprobs (B,) fp32 under the sampling distribution.
    overwrite: work in `logits` itself. The decode loop owns its logits, and on the CPU a fresh (B, V)
    buffer per step costs more in page faults than the arithmetic."""
    if temperature == 0:
        tok = logits.argmax(-1, keepdim=True)
        return tok[:, 0], (logits.gather(-1, tok) - logits.logsumexp(-1, keepdim=True))[:, 0]
    given = logits
    if temperature != 1:
        logits = logits.div_(temperature) if overwrite else logits / temperature
    idx = None  # vocabulary ids of the columns of `logits` once it is sorted/truncated
    if 0 < top_k < logits.size(-1):
        logits, idx = logits.topk(top_k, dim=-1)  # (B, k), descending
    if top_p < 1.0:
        if idx is None:
            logits, idx = logits.sort(dim=-1, descending=True)
        p = logits.softmax(-1)
        mass_before = p.cumsum(-1) - p  # exactly 0 for the top token, so it always stays
        logits = logits.masked_fill(mass_before >= top_p, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    own = overwrite or logits is not given  # in place unless it is the caller's tensor, to be kept
    w = (logits.sub_(m) if own else logits - m).exp_()  # (B, K) unnormalised probabilities, 1 at the top token
    j, total = _inverse_cdf(w, u)
    tok = j if idx is None else idx.gather(-1, j)
    # the drawn column always has weight > 0 (see _inverse_cdf), so its log is finite
    return tok[:, 0], (w.gather(-1, j).log() - total.log())[:, 0]


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor):
    """For weights w (B, K) >= 0, the first column j whose cumulative weight exceeds u * total, and the
    total (both (B, 1)). A cumsum over a 152k vocabulary is a slow sequential scan, so it runs in two
    levels: over sums of CDF_BLOCK columns, then inside the one block that holds the draw. Rounding can put the target at or past the total: j is clamped to
    the last column with weight, never a zero-weight (padding, filtered or underflowed) one."""
    B, K = w.shape
    if K % CDF_BLOCK:
        w = F.pad(w, (0, -K % CDF_BLOCK))
    blocks = w.view(B, -1, CDF_BLOCK)  # (B, nb, CDF_BLOCK)
    cdf = blocks.sum(-1).cumsum(-1)  # (B, nb)
    total = cdf[:, -1:]
    target = u[:, None] * total
    b = torch.minimum(torch.searchsorted(cdf, target, right=True), (cdf < total).sum(-1, keepdim=True))
    before = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp(min=0)), 0.0)  # mass of the blocks before b
    inner = blocks.gather(1, b[:, :, None].expand(B, 1, CDF_BLOCK))[:, 0].cumsum(-1)  # (B, CDF_BLOCK)
    k = torch.minimum(torch.searchsorted(inner, target - before, right=True),
                      (inner < inner[:, -1:]).sum(-1, keepdim=True))
    return b * CDF_BLOCK + k, total


def attend_length(n: int, S: int) -> int:
    """The cache prefix a decode step attends over when its longest row holds n positions: n rounded up to a
    multiple of PREFIX_ROUND, or of 1/8 of the power of two at or below n once that is larger; at most S.
    About 8 lengths per doubling: the graphs captured per (width, length) stay few."""
    step = max(PREFIX_ROUND, 1 << max(n.bit_length() - 4, 0))
    return min(S, -(-n // step) * step)


def _decode(model: Transformer, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, u: torch.Tensor,
            temperature: float, top_k: int, top_p: float):
    """One decode step: feed tok at pos (B, 1), sample the next token with uniforms u (B,); returns tokens
    and logprobs (B,). This is what `compile=True` compiles, sampling included, so that the sampler's
    elementwise passes over the (B, V) logits fuse into few kernels."""
    mask = torch.arange(cache.length, device=pos.device) <= pos[:, :, None]  # (B, 1, S): a row sees its own past
    logits = model(tok, position_ids=pos, mask=mask[:, None], cache=cache)[:, -1].float()
    return sample(logits, u, temperature, top_k, top_p, overwrite=True)


def _graphed(fn, device):
    """fn(width) -> tensor, replayed from one CUDA graph per (width, length) key. A key's first call runs fn
    for real on a side stream, which is the warm-up capture needs, then records it into a memory pool shared
    by this call's graphs; later calls replay it. fn must keep its shapes, tensor addresses and Python
    branches fixed per key, sync nothing and take its randomness from tensors filled beforehand."""
    graphs, pool, side = {}, torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)

    def run(width, length):
        if (width, length) in graphs:
            graph, out = graphs[width, length]
            graph.replay()
            return out
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = fn(width)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            graphs[width, length] = graph, fn(width)  # recorded, not run
        torch.cuda.current_stream(device).wait_stream(side)
        return out
    return run


def _prefill(model: Transformer, prompts: list[list[int]], device, dtype):
    """Run prompts through the model, in chunks of right-padded rows. Returns, per prompt, its keys and
    values (n_layer, n_kv, len, hd) and its last-position logits (V,) in fp32."""
    out = []
    i = 0
    while i < len(prompts):
        T = max(len(p) for p in prompts[i:])  # longest remaining: chunks never under-estimate the padding
        chunk = prompts[i:i + max(1, PREFILL_TOKENS // T)]
        T = max(len(p) for p in chunk)
        ids = torch.tensor([p + [0] * (T - len(p)) for p in chunk], device=device)  # (B, T)
        last = torch.tensor([[len(p) - 1] for p in chunk], device=device)  # (B, 1)
        cache = KVCache(model.args, len(chunk), T, device, dtype)
        # no mask: a causal prefill of T tokens into a T-long cache (flash attention on CUDA)
        logits = model(ids, cache=cache, logits_at=last)  # (B, 1, V)
        for b, p in enumerate(chunk):  # padding sits after each prompt's end, so causal attention ignores it
            out.append((cache.k[:, b, :, :len(p)], cache.v[:, b, :, :len(p)], logits[b, 0].float()))
        i += len(chunk)
    return out


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], n: int, max_new_tokens: int | list[int], temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids=None, seed: int | list[int] = 0, max_batch: int = 256,
             compile: bool = False, cuda_graphs: bool | None = None, pad_id: int = 0,
             progress: bool = False) -> Rollout:
    """Sample n completions of at most max_new_tokens for each prompt (lists of token ids); max_new_tokens
    may be a list with one limit per prompt (difficulty-aware truncation).
    eos_ids: stop tokens, an int or a list; None means the model's `args.eos_token_id`, () never stops.
    seed: an int for the whole call, or a list of one int per prompt (see Randomness above).
    max_batch: number of cache slots (rows decoded together). compile: torch.compile the decode step.
    cuda_graphs: replay the decode step from CUDA graphs; None means on CUDA, off on the CPU."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if n < 1 or len(limits) != len(prompts) or min(limits, default=0) < 1 or any(len(p) == 0 for p in prompts):
        raise ValueError(f"generate needs n >= 1, non-empty prompts and max_new_tokens >= 1 (an int or one per "
                         f"prompt); got n={n}, {len(prompts)} prompts, max_new_tokens={max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if not isinstance(seed, int) and len(seed) != len(prompts):
        raise ValueError(f"generate: {len(seed)} seeds for {len(prompts)} prompts (one per prompt, or one int)")
    eos_ids = model.args.eos_token_id if eos_ids is None else eos_ids
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    was_training = model.training
    model.eval()
    step = torch.compile(_decode) if compile else _decode
    N, L = len(prompts) * n, max(limits)
    B = min(max_batch, N)
    S = max(len(p) + lim for p, lim in zip(prompts, limits))

    # 1. Static cache, outputs (with a spare row N that idle slots write into), the uniforms table.
    cache = KVCache(model.args, B, S, device, dtype)
    out_tok = torch.full((N + 1, L), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(N + 1, L, device=device)
    lengths = torch.zeros(N + 1, dtype=torch.long, device=device)
    finished = torch.zeros(N + 1, dtype=torch.bool, device=device)
    if isinstance(seed, int):
        u = torch.rand(N + 1, L, generator=torch.Generator().manual_seed(seed))
    else:  # prompt p's rows from its own generator, at its own limit; row N (idle slots) draws nothing it needs
        u = torch.cat([F.pad(torch.rand(n, lim, generator=torch.Generator().manual_seed(s)), (0, L - lim))
                       for s, lim in zip(seed, limits)] + [torch.zeros(1, L)])
    u = u.to(device)
    row_limit = torch.tensor([lim for lim in limits for _ in range(n)] + [L], device=device)  # (N + 1,)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    slot_ids = torch.arange(B, device=device)
    row = torch.full((B,), N, dtype=torch.long, device=device)  # the row each slot serves; N = idle
    count = torch.zeros(B, dtype=torch.long, device=device)  # tokens the slot's row has so far
    pos = torch.zeros(B, dtype=torch.long, device=device)  # position (= cache index) of the slot's last token
    tok = torch.zeros(B, dtype=torch.long, device=device)  # the slot's last token, fed at the next step
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, desc="rollout", unit="seq")

    def take(slots, new_tok, new_lp, new_pos):
        """Append one sampled token (at position new_pos) to the rows in `slots`; free the slots of rows
        that stop (idle slots sit at count 0, position 0). Returns how many rows stopped (a tensor: no sync)."""
        r, c = row[slots], count[slots]
        out_tok[r, c], out_lp[r, c] = new_tok, new_lp
        c = c + 1
        hit = (new_tok[:, None] == eos).any(-1)  # not torch.isin: it may sort, and sync, inside a graph
        stop = (hit | (c == row_limit[r])) & (r < N)
        lengths[r], finished[r] = c, hit
        r = torch.where(stop, N, r)
        row[slots], tok[slots] = r, new_tok
        count[slots] = torch.where(r == N, 0, c)
        pos[slots] = torch.where(r == N, 0, new_pos)
        return stop.sum()

    def decode(width):
        """4-5 for the first `width` slots, over the first cache.length positions: what a CUDA graph replays."""
        new_tok, new_lp = step(model, tok[:width, None], pos[:width, None], cache, u[row[:width], count[:width]],
                               temperature, top_k, top_p)
        return take(slot_ids[:width], new_tok, new_lp, pos[:width] + 1)

    run = _graphed(decode, device) if cuda_graphs else lambda width, length: decode(width)

    # on the CPU in fp32 the linear layers run from oneDNN-packed weights, which torch.compile cannot trace
    with contextlib.nullcontext() if compile else packed_weights(model, B):
        next_row, width, held = 0, B, {}  # held: prompt -> prefill (k, v, logits) while samples still wait
        running, top = 0, 0  # rows in slots; an upper bound on the slots' largest position (host-side, no sync)
        while True:
            # 2. Admission: free slots take waiting rows; prompts are prefilled once, first tokens drawn.
            while next_row < N and running < B:
                free = (row == N).nonzero()[:, 0]
                rows = torch.arange(next_row, min(N, next_row + len(free)), device=device)
                slots = free[:len(rows)]
                first, last = next_row // n, (next_row + len(rows) - 1) // n
                need = [p for p in range(first, last + 1) if p not in held]
                held.update(zip(need, _prefill(model, [prompts[p] for p in need], device, dtype)))
                plen = torch.zeros_like(rows)
                for p in range(first, last + 1):
                    k, v, _ = held[p]
                    mine = rows // n == p
                    cache.k[:, slots[mine], :, :k.size(2)] = k[:, None]  # (n_layer, m, n_kv, len, hd)
                    cache.v[:, slots[mine], :, :k.size(2)] = v[:, None]
                    plen[mine] = k.size(2)
                    top = max(top, k.size(2))
                logits = torch.stack([held[p][2] for p in (rows // n).tolist()])  # (m, V)
                row[slots] = rows
                # the first token sits right after the prompt, at position len(prompt)
                done = int(take(slots, *sample(logits, u[rows, 0], temperature, top_k, top_p), plen))
                next_row += len(rows)
                running += len(rows) - done
                for p in range(first, last + (next_row % n == 0)):  # drop prompts whose samples are all in
                    del held[p]
                if bar:
                    bar.update(done)
            if running == 0:
                break

            # 3. Nothing waits and the rows fit in half the width: pack them into the front slots.
            if next_row == N and running <= width // 2:
                new_width = 1 << (running - 1).bit_length()  # next power of two >= running
                busy = row[:width] < N
                src = busy.nonzero()[:, 0]
                src = src[src >= new_width]
                dst = (~busy[:new_width]).nonzero()[:, 0][:len(src)]
                for buf in (cache.k, cache.v):
                    buf[:, dst, :, :top + 1] = buf[:, src, :, :top + 1]
                for t in (row, count, pos, tok):
                    t[dst] = t[src]
                row[new_width:width] = N
                width = new_width

            # 4. Decode one token for every slot in use, attending over the used prefix of the cache (flash-attn
            # reads each row's own length, so one graph per width). 5. Rows that stop free their slots.
            cache.length = S if cache.flash else attend_length(top + 1, S)
            done = int(run(width, cache.length))
            running -= done
            top += 1
            if done:  # the longest row may have stopped: tighten the bound (one more host sync, rarely)
                top = int(pos[:width].max())
            if bar:
                bar.update(done)

    if bar:
        bar.close()
    model.train(was_training)
    Lmax = int(lengths[:N].max())
    with torch.inference_mode(False):  # ordinary tensors: the trainer feeds them to autograd
        return Rollout(tokens=out_tok[:N, :Lmax].cpu().clone(), logprobs=out_lp[:N, :Lmax].cpu().clone(),
                       lengths=lengths[:N].cpu().clone(), finished=finished[:N].cpu().clone(),
                       prompt_index=torch.arange(N) // n)
