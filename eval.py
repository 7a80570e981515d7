"""
Evaluation: pass@1, length, truncation, hesitation keywords, perplexity of the reasoning, and the
budget-forcing baseline, for one or more checkpoints on one or more benchmarks.

    python eval.py --ckpt runs/x/step_000100 --data aime24,amc23 --out runs/x/eval
    python eval.py --ckpt BASE,PRUNED --data aime24 --budget 500,1000,2000,4000,8000 --ref REF_DIR --out OUT
    torchrun --nproc_per_node 8 eval.py --ckpt ... --data math500 --out OUT   # problems split over ranks

Writes `OUT/eval.json` (every run's aggregates and per-problem results), `OUT/eval.md` (Markdown tables;
with two or more checkpoints the keyword table puts them side by side) and `OUT/records.jsonl` (one
line per completion, text included, for later analysis). In Python, `evaluate(model, tokenizer,
problems, ...)` returns the same numbers as a dict; `schedule.py` and the embedded demo call it.

Choices:
- Defaults are the paper's evaluation: temperature 0.6, top-p 0.95, up to 32,000 new tokens, 64
  samples per problem for AIME24 and AMC23 and 16 for the others (`SAMPLES`, keyed by file name; `--samples`
  overrides), and no length prompt (`limit=None`): the pruned model has to be short on its own.
- pass@1 is the mean correctness of the k samples of a problem, averaged over problems. A completion is
  correct when `reward.score` says so, so a completion cut off at `max_new_tokens` counts as wrong.
- Length is every generated token, EOS included; truncation rate is the fraction with no EOS.
- Keywords (`KEYWORDS`): each phrase is counted on its own, case-insensitively, at word boundaries, over
  the whole completion; so "But wait" also counts as a "Wait". Reported per completion (mean count) and
  per 1,000 generated tokens (total count / total tokens).
- Perplexity of the reasoning: the text before `</think>` (all of it when the thinking never closed) is
  re-tokenized by the reference model's tokenizer and scored on its own, after BOS where the tokenizer
  has one; exp of the mean token NLL over all completions.
- Budget forcing (s1-style, as the paper's baseline): sample up to B tokens; a row still open at B gets
  `FORCE_CUE` appended if its thinking has not closed (the paper's code appends
  "</think>\\n\\n**Final Answer:**\\n\\n"), or nothing if it has, and then `answer_budget` more tokens to
  finish. Rows that ended within B are graded as they are. The reported length counts every token of the
  output: the thinking, the cue and the answer.
- Sampling is seeded per problem, by `seed` and the problem's index in the list (rollout.generate with
  one seed per prompt): a problem gets the same samples whichever other problems share its batch, so
  every checkpoint is validated on common random numbers and the numbers do not depend on the world size.
- Under torchrun, rank r takes problems r, r+W, r+2W, ...; the records are gathered on rank 0, which
  computes the aggregates and broadcasts them, so every rank returns the same numbers (the
  per-completion records come back on rank 0 only).
"""

import argparse
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import DATA_DIR, build_prompt, load_problems
from model import Transformer
from reward import score
from rollout import Rollout, generate

SAMPLES = {"aime24": 64, "amc23": 64}  # the paper's k for the two small benchmarks
DEFAULT_SAMPLES = 16  # the paper's k for MATH500, OlympiadBench, Minerva (and our validation set)
KEYWORDS = ("Wait", "But wait", "Alternatively", "Hmm", "Let me check", "double-check", "verify")
THINK_END = "</think>"
FORCE_CUE = "</think>\n\n**Final Answer:**\n\n"
KEYWORD_RES = {kw: re.compile(r"(?<!\w)" + re.escape(kw) + r"(?!\w)", re.IGNORECASE) for kw in KEYWORDS}


@dataclass
class Completion:
    """One sampled completion, graded."""
    problem_id: str
    sample: int  # j of the problem's k samples
    correct: float  # reward.score: 1.0 or 0.0
    length: int  # generated tokens, EOS (and a forced cue) included
    finished: bool  # ended with EOS within the token budget
    text: str  # decoded completion, special tokens dropped
    keywords: dict = field(default_factory=dict)  # keyword -> count in text
    forced: bool = False  # budget forcing cut this row at B and appended the cue
    ref_nll: float = 0.0  # summed NLL of the reasoning under the reference model (0 without one)
    ref_tokens: int = 0  # reference-tokenizer tokens that ref_nll sums over


def benchmark_path(name: str) -> Path:
    """A short name (aime24, amc23, math500, olympiadbench, minerva, aime_val) or a JSONL path."""
    p = Path(name)
    if p.suffix == ".jsonl" or p.exists():
        return p
    return DATA_DIR / f"{name}.jsonl"


def samples_for(name: str) -> int:
    return SAMPLES.get(Path(name).stem, DEFAULT_SAMPLES)


def count_keywords(text: str) -> dict:
    return {kw: len(r.findall(text)) for kw, r in KEYWORD_RES.items()}


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: the model config's eos_token_id (int or list) and the tokenizer's."""
    ids = model.args.eos_token_id
    ids = set([ids] if isinstance(ids, int) else ids or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def problem_seed(seed: int, i: int) -> int:
    """The sampling seed of problem i (or of a budget-forcing tail) under the run's seed."""
    return (seed * 1_000_003 + i) % 2**63


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- sampling ------------------------------------------------------------------------------------------

def budget_force(model, tokenizer, prompts: list[list[int]], n: int, budget: int, answer_budget: int,
                 temperature: float, top_p: float, seeds: list[int], eos: tuple[int, ...], **gen_kw):
    """Budget forcing: sample up to `budget` tokens; rows still open get the cue (if their thinking is
    still open) and `answer_budget` more tokens. seeds: one per prompt. Returns (Rollout of the whole
    outputs, forced (N,) bool)."""
    first = generate(model, prompts, n, budget, temperature=temperature, top_p=top_p, eos_ids=eos, seed=seeds,
                     **gen_kw)
    cue = tokenizer.encode(FORCE_CUE, add_special_tokens=False)
    N = first.tokens.size(0)
    open_rows = [i for i in range(N) if not first.finished[i]]
    heads, forced = {}, torch.zeros(N, dtype=torch.bool)  # heads: open row -> its tokens so far (+ cue)
    for i in open_rows:
        head = first.tokens[i, :first.lengths[i]].tolist()
        if THINK_END not in tokenizer.decode(head, skip_special_tokens=True):
            head, forced[i] = head + cue, True
        heads[i] = head
    tails = None
    if open_rows:  # one continuation per open row, from its own prompt + what it wrote so far
        # row i = sample i % n of its prompt: its own seed, from the prompt's, so a row's tail does not
        # depend on which other rows were still open
        tails = generate(model, [prompts[first.prompt_index[i]] + heads[i] for i in open_rows], 1, answer_budget,
                         temperature=temperature, top_p=top_p, eos_ids=eos, **gen_kw,
                         seed=[problem_seed(seeds[first.prompt_index[i]], 1 + i % n) for i in open_rows])
    tail_of = {i: k for k, i in enumerate(open_rows)}  # open row -> its row in `tails`
    rows, logps, finished = [], [], first.finished.clone()
    for i in range(N):
        if i not in heads:
            rows.append(first.tokens[i, :first.lengths[i]])
            logps.append(first.logprobs[i, :first.lengths[i]])
            continue
        k = tail_of[i]
        L1, L2 = int(first.lengths[i]), int(tails.lengths[k])
        rows.append(torch.cat([torch.tensor(heads[i]), tails.tokens[k, :L2]]))
        # the cue was not sampled: log-prob 0 there, like padding
        logps.append(torch.cat([first.logprobs[i, :L1], torch.zeros(len(heads[i]) - L1), tails.logprobs[k, :L2]]))
        finished[i] = tails.finished[k]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.zeros(N, int(lengths.max()), dtype=torch.long)  # (N, Lmax), right-padded with 0
    logprobs = torch.zeros(N, int(lengths.max()))
    for i, (r, lp) in enumerate(zip(rows, logps)):
        tokens[i, :len(r)], logprobs[i, :len(r)] = r, lp
    return Rollout(tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished,
                   prompt_index=first.prompt_index.clone()), forced


@torch.no_grad()
def reasoning_nll(ref_model, ref_tokenizer, texts: list[str], max_tokens: int = 16384,
                  chunk: int = 2048) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each text's reasoning (before </think>) under the reference model.
    Batches hold at most max_tokens padded tokens (one long text goes alone), and the fp32
    log-softmax runs over `chunk` positions of one row at a time: 32k tokens x a 152k vocabulary
    would not fit."""
    device = next(ref_model.parameters()).device
    bos = [ref_tokenizer.bos_token_id] if ref_tokenizer.bos_token_id is not None else []
    seqs = [bos + ref_tokenizer.encode(t.split(THINK_END)[0], add_special_tokens=False) for t in texts]
    out, s = [], 0
    while s < len(seqs):
        n = 1  # grow the batch while its padded size stays within max_tokens
        while s + n < len(seqs) and (n + 1) * max(len(x) for x in seqs[s:s + n + 1]) <= max_tokens:
            n += 1
        batch = seqs[s:s + n]
        T = max(len(x) for x in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # (B, T), right-padded
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
        nll = ids[:, :0].float()  # (B, 0): texts of one token or none have nothing to predict
        if T > 1:
            logits = ref_model(ids)  # (B, T, V); padding sits after each text, so causal attention ignores it
            # position t predicts ids[:, t + 1]: the last position predicts nothing; one row's `chunk`
            # positions at a time in fp32
            nll = torch.stack([torch.cat([F.cross_entropy(logits[b, t:min(t + chunk, T - 1)].float(),
                                                          ids[b, t + 1:t + 1 + chunk], reduction="none")
                                          for t in range(0, T - 1, chunk)]) for b in range(len(batch))])  # (B, T-1)
        for i, x in enumerate(batch):
            n_pred = max(len(x) - 1, 0)
            out.append((float(nll[i, :n_pred].sum()), n_pred))
        s += n
    return out


# ---- one model on one problem set ----------------------------------------------------------------------

def evaluate(model, tokenizer, problems: list[dict], samples: int, max_new_tokens: int, temperature: float = 0.6,
             top_p: float = 0.95, seed: int = 0, limit: int | None = None, system_prompt: str | None = None,
             budget: int | None = None, answer_budget: int = 256, ref=None, max_batch: int | None = None) -> dict:
    """Sample `samples` completions per problem and grade them; returns `summarize(records)` plus
    "records" (list of Completion). `limit` puts the length prompt in the system turn (none by default);
    `budget` turns on budget forcing at B=budget; `ref` = (model, tokenizer) adds the perplexity."""
    t0 = time.time()
    rank, world = _rank_world()
    mine = problems[rank::world]
    if limit is not None and system_prompt is None:
        raise ValueError("evaluate: a length prompt (limit) needs the system_prompt it goes in")
    prompts = [build_prompt(tokenizer, p["problem"], limit, system_prompt or "") for p in mine]
    gen_kw = {} if max_batch is None else {"max_batch": max_batch}
    eos = eos_ids(model, tokenizer)
    seeds = [problem_seed(seed, i) for i in range(rank, len(problems), world)]  # by index in `problems`
    records = []
    if mine:
        was_training = model.training
        model.eval()
        if budget is None:
            ro = generate(model, prompts, samples, max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_ids=eos, seed=seeds, **gen_kw)
            forced = torch.zeros(ro.tokens.size(0), dtype=torch.bool)
        else:
            ro, forced = budget_force(model, tokenizer, prompts, samples, budget, answer_budget, temperature, top_p,
                                      seeds, eos, **gen_kw)
        model.train(was_training)
        for i in range(ro.tokens.size(0)):
            p = mine[int(ro.prompt_index[i])]
            text = tokenizer.decode(ro.tokens[i, :ro.lengths[i]].tolist(), skip_special_tokens=True)
            finished = bool(ro.finished[i])
            records.append(Completion(problem_id=str(p["id"]), sample=i % samples,
                                      correct=float(score(text, p["answer"], finished)), length=int(ro.lengths[i]),
                                      finished=finished, text=text, keywords=count_keywords(text),
                                      forced=bool(forced[i])))
        if ref is not None:
            for r, (nll, n) in zip(records, reasoning_nll(ref[0], ref[1], [r.text for r in records])):
                r.ref_nll, r.ref_tokens = nll, n
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        if rank == 0:
            order = {str(p["id"]): k for k, p in enumerate(problems)}
            records = sorted((r for part in gathered for r in part), key=lambda r: (order[r.problem_id], r.sample))
        box = [summarize(records) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    else:
        summary = summarize(records)
    summary["seconds"] = round(time.time() - t0, 2)
    return {**summary, "records": records if rank == 0 else []}


def summarize(records: list[Completion]) -> dict:
    """Aggregates over completions: pass@1 (per-problem mean, then mean over problems), lengths, truncation,
    keyword rates, perplexity when the records carry reference NLLs, and a per-problem breakdown."""
    by_problem = {}
    for r in records:
        by_problem.setdefault(r.problem_id, []).append(r)
    lengths = [r.length for r in records]
    total_tokens = max(sum(lengths), 1)
    problems = [{"id": pid, "accuracy": sum(r.correct for r in rs) / len(rs),
                 "mean_length": sum(r.length for r in rs) / len(rs),
                 "truncation_rate": sum(not r.finished for r in rs) / len(rs)} for pid, rs in by_problem.items()]
    n = max(len(records), 1)
    out = {
        "accuracy": sum(p["accuracy"] for p in problems) / max(len(problems), 1),
        "mean_length": sum(lengths) / n,
        "median_length": statistics.median(lengths) if lengths else 0.0,
        "truncation_rate": sum(not r.finished for r in records) / n,
        "forced_rate": sum(r.forced for r in records) / n,
        "keywords": {kw: {"per_completion": sum(r.keywords.get(kw, 0) for r in records) / n,
                          "per_1k_tokens": 1000 * sum(r.keywords.get(kw, 0) for r in records) / total_tokens}
                     for kw in KEYWORDS},
        "n_problems": len(problems),
        "n_completions": len(records),
    }
    ref_tokens = sum(r.ref_tokens for r in records)
    if ref_tokens:
        out["perplexity"] = math.exp(sum(r.ref_nll for r in records) / ref_tokens)
    out["problems"] = problems
    return out


def write_json(path: Path, obj):
    """Write JSON atomically (a temporary file, then a rename): a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def headline(res: dict) -> dict:
    """The numbers a summary quotes from an `evaluate` result."""
    return {"accuracy": res["accuracy"], "mean_length": res["mean_length"],
            "wait_per_completion": res["keywords"]["Wait"]["per_completion"]}


# ---- tables --------------------------------------------------------------------------------------------

def results_table(runs: list[dict]) -> str:
    """Markdown: one row per (checkpoint, benchmark, budget) run."""
    lines = ["| checkpoint | benchmark | budget | k | pass@1 (%) | mean len | median len | truncated (%) "
             "| Wait/compl | perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['ckpt']} | {r['data']} | {r.get('budget') or '-'} | {r.get('samples', '-')} "
                     f"| {100 * r['accuracy']:.1f} | {r['mean_length']:.0f} | {r['median_length']:.0f} "
                     f"| {100 * r['truncation_rate']:.1f} | {r['keywords']['Wait']['per_completion']:.2f} | {ppl} |")
    return "\n".join(lines)


def keyword_table(runs: list[dict], label: str = "ckpt") -> str:
    """Markdown: keywords down, runs across (per completion / per 1k tokens), e.g. before vs after pruning."""
    head = "| keyword | " + " | ".join(f"{r[label]} /compl | {r[label]} /1k tok" for r in runs) + " |"
    lines = [head, "|---|" + "---|---|" * len(runs)]
    for kw in KEYWORDS:
        cells = " | ".join(f"{r['keywords'][kw]['per_completion']:.2f} | {r['keywords'][kw]['per_1k_tokens']:.2f}"
                           for r in runs)
        lines.append(f"| {kw} | {cells} |")
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------------

def load_model(path: str, device):
    from transformers import AutoTokenizer  # only the CLI and schedule.py load from disk
    return Transformer.from_pretrained(path, device=device).eval(), AutoTokenizer.from_pretrained(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--ckpt", required=True, help="checkpoint dir(s), comma-separated (two: before vs after)")
    ap.add_argument("--data", default="aime24,amc23,math500,olympiadbench,minerva",
                    help="benchmark short names or JSONL paths, comma-separated")
    ap.add_argument("--samples", type=int, default=None, help="k per problem (default: 64 for aime24/amc23, else 16)")
    ap.add_argument("--max_new_tokens", type=int, default=32000)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="state this limit in the system prompt (default: none)")
    ap.add_argument("--system_prompt", default=None,
                    help="with --limit: the system prompt, \"{L}\" = the limit (default: train.py's)")
    ap.add_argument("--budget", default="", help="budget forcing at these B, comma-separated (e.g. 500,1000,2000)")
    ap.add_argument("--answer_budget", type=int, default=256, help="tokens allowed after the forced cue")
    ap.add_argument("--ref", default=None, help="reference model dir for the perplexity of the reasoning")
    ap.add_argument("--n_problems", type=int, default=None,
                    help="only the first N problems of each benchmark (default: all)")
    # KV cache of R1-Distill-1.5B at 32k tokens: ~0.93 GB a row in bf16, so 32 rows ~ 30 GB
    ap.add_argument("--max_batch", type=int, default=32, help="rows decoded together (KV-cache slots)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.n_problems is not None and args.n_problems < 1:
        ap.error(f"--n_problems={args.n_problems}: give N >= 1, or leave it out for every problem")
    try:
        budgets = [None] + [int(b) for b in args.budget.split(",") if b]
    except ValueError:
        ap.error(f"--budget={args.budget}: expected token counts, comma-separated")

    # SYSTEM_PROMPT: what the model was trained with
    from train import SYSTEM_PROMPT, destroy_process_group, init_process_group
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        init_process_group(torch.cuda.is_available())
    if args.limit is not None and args.system_prompt is None:
        args.system_prompt = SYSTEM_PROMPT
    rank, _ = _rank_world()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # every benchmark is read before any model is loaded: a bad name fails now, not after hours of sampling
    benches = {name: load_problems(benchmark_path(name))[:args.n_problems] for name in args.data.split(",")}
    ref = load_model(args.ref, device) if args.ref else None
    runs, out = [], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec_file = open(out / "records.jsonl", "w") if rank == 0 else None
    for ckpt in args.ckpt.split(","):
        model, tokenizer = load_model(ckpt, device)
        for name, problems in benches.items():
            k = args.samples or samples_for(name)
            for B in budgets:
                res = evaluate(model, tokenizer, problems, k, args.max_new_tokens, args.temperature, args.top_p,
                               args.seed, limit=args.limit, system_prompt=args.system_prompt, budget=B,
                               answer_budget=args.answer_budget, ref=ref, max_batch=args.max_batch)
                records = res.pop("records")
                run = {"ckpt": ckpt, "data": name, "budget": B, "samples": k, **res}
                runs.append(run)
                if rank == 0:
                    for r in records:
                        rec_file.write(json.dumps({"ckpt": ckpt, "data": name, "budget": B, **asdict(r)}) + "\n")
                    rec_file.flush()
                    # after every run, so that a kill or a crash later keeps what is done
                    write_json(out / "eval.json", {"args": vars(args), "runs": runs})
                    print(f"{ckpt} {name} B={B or '-'}: pass@1 {100 * res['accuracy']:.1f}% "
                          f"mean len {res['mean_length']:.0f} truncated {100 * res['truncation_rate']:.1f}% "
                          f"({res['seconds']:.0f}s)", flush=True)
        del model
    if rank == 0:
        rec_file.close()
        plain = [r for r in runs if r["budget"] is None]
        md = ["# Evaluation", "", results_table(runs), ""]
        for name in benches:
            md += [f"## Keywords: {name}", "", keyword_table([r for r in plain if r["data"] == name]), ""]
        (out / "eval.md").write_text("\n".join(md))
        print("\n".join(md))
    if dist.is_initialized():
        destroy_process_group()


if __name__ == "__main__":
    main()
