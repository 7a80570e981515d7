"""
Evaluation: pass@1, length, truncation, hesitation keywords, perplexity of the reasoning, and the
budget-forcing baseline, for one or more checkpoints on one or more benchmarks.

    python eval.py --ckpt=runs/x/step_000100 --data=aime24,amc23 --out=runs/x/eval
    python eval.py --ckpt=BASE,PRUNED --data=aime24 --budget=500,1000,2000 --ref=REF_DIR --out=OUT
    torchrun --nproc_per_node 8 eval.py --ckpt=... --data=math500 --out=OUT   # problems split over ranks

Writes OUT/eval.json (aggregates and per-problem results), OUT/eval.md (tables; two or more
checkpoints side by side) and OUT/records.jsonl (one line per completion, text included); each is
written under a temporary name and renamed when complete. `evaluate(model, tokenizer, problems, ...)`
returns the same numbers as a dict; schedule.py and the demo call it.

Choices:
- Defaults are the paper's: temperature 0.6, top-p 0.95, up to 32,000 new tokens, 64 samples per problem
  for AIME24 and AMC23 and 16 for the others, and no length prompt: a pruned model must be short alone.
- pass@1 is the mean correctness of a problem's k samples, averaged over problems; a completion cut off
  at max_new_tokens is wrong (reward.score). Length counts every generated token, EOS included.
- Keywords are counted each on its own, case-insensitively, at word boundaries ("But wait" is also a
  "Wait"), per completion and per 1,000 generated tokens.
- Perplexity of the reasoning: the text before </think> re-tokenized and scored by a reference model.
- Budget forcing (s1-style, the paper's baseline): sample up to B tokens; a row still open gets
  FORCE_CUE if its thinking is open, then `answer_budget` more tokens. Length counts every token.
- Sampling is seeded per problem (by seed and the problem's index), so every checkpoint is measured
  on common random numbers, whatever the batch or the world size. Under torchrun rank r takes problems
  r, r+W, ...; rank 0 gathers the records and broadcasts the aggregates.
"""

import json
import math
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import distributed
from checkpoint import lock
from config import check, load_config
from data import DATA_DIR, SYSTEM_PROMPT, build_prompt, eos_ids, load_problems, seed_for
from model import Transformer, attention_backend, check_dir
from report import keyword_table, results_table, write_json, write_text
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
                         seed=[seed_for(seeds[first.prompt_index[i]], 1 + i % n) for i in open_rows])
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
    """(summed NLL, tokens) of each text's reasoning (before </think>) under the reference model, after
    BOS where its tokenizer has one. Batches hold at most max_tokens padded tokens (one long text goes
    alone); the model's chunked log-probs keep 32k tokens x a 152k vocabulary out of memory."""
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
        logp = ids[:, :0].float()  # (B, 0): texts of one token or none have nothing to predict
        if T > 1:  # position t predicts ids[:, t + 1]; padding sits after each text, so causal attention ignores it
            logp, _ = ref_model(ids[:, :-1], targets=ids[:, 1:], chunk=chunk)  # (B, T-1)
        for i, x in enumerate(batch):
            out.append((-float(logp[i, :max(len(x) - 1, 0)].sum()), max(len(x) - 1, 0)))
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
    rank, world = distributed.rank(), distributed.world()
    mine = problems[rank::world]
    if limit is not None and system_prompt is None:
        raise ValueError("evaluate: a length prompt (limit) needs the system_prompt it goes in")
    prompts = [build_prompt(tokenizer, p["problem"], limit, system_prompt or "") for p in mine]
    gen_kw = {} if max_batch is None else {"max_batch": max_batch}
    eos = eos_ids(tokenizer, model.args.eos_token_id)
    seeds = [seed_for(seed, i) for i in range(rank, len(problems), world)]  # by index in `problems`
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


# ---- CLI -----------------------------------------------------------------------------------------------

def load_model(path: str, device):
    """The model and tokenizer of an HF dir; what the dir lacks is named first (model.check_dir)."""
    from transformers import AutoTokenizer  # only the CLI and schedule.py load from disk
    check_dir(path)
    return Transformer.from_pretrained(path, device=device).eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class EvalConfig:
    ckpt: str = ""  # checkpoint dir(s), comma-separated (two: before vs after)
    data: str = "aime24,amc23,math500,olympiadbench,minerva"  # short names or JSONL paths, comma-separated
    out: str = ""  # output directory
    samples: int | None = None  # k per problem; None: 64 for aime24/amc23, 16 for the others
    max_new_tokens: int = 32000
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    limit: int | None = None  # state this limit in the system prompt (None: no length prompt)
    system_prompt: str = SYSTEM_PROMPT  # with a limit; "{L}" = the limit
    budget: str = ""  # budget forcing at these B, comma-separated (e.g. 500,1000,2000)
    answer_budget: int = 256  # tokens allowed after the forced cue
    ref: str = ""  # reference model dir for the perplexity of the reasoning
    n_problems: int | None = None  # only the first N problems of each benchmark (None: all)
    # KV cache of R1-Distill-1.5B at 32k tokens: ~0.93 GB a row in bf16, so 32 rows ~ 30 GB
    max_batch: int = 32  # rows decoded together (KV-cache slots)

    def budgets(self) -> list[int]:
        return [int(b) for b in self.budget.split(",") if b.strip()]

    def check(self):
        check(bool(self.ckpt), "ckpt", self.ckpt, "give the checkpoint dir(s) to evaluate")
        check(bool(self.out), "out", self.out, "give the output directory")
        check(self.samples is None or self.samples >= 1, "samples", self.samples, "k >= 1 (None: the paper's k)")
        check(self.n_problems is None or self.n_problems >= 1, "n_problems", self.n_problems,
              "N >= 1, or None for every problem")
        check(all(b.strip().isdigit() and int(b) >= 1 for b in self.budget.split(",") if b.strip()),
              "budget", self.budget, "token counts >= 1, comma-separated")
        for key in ("max_new_tokens", "answer_budget", "max_batch"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 (None: no length prompt)")
        check(self.temperature >= 0 and math.isfinite(self.temperature), "temperature", self.temperature,
              "a finite number >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and not argv[0].startswith("--") else None
    cfg = load_config(path, argv[1:] if path else argv, EvalConfig)
    d = distributed.init()
    # every benchmark is read before any model is loaded: a bad name fails now, not after hours of sampling
    benches = {name: load_problems(benchmark_path(name))[:cfg.n_problems] for name in cfg.data.split(",")}
    ref = load_model(cfg.ref, d.device) if cfg.ref else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with lock(out) if d.rank == 0 else nullcontext():
        run_all(cfg, d, benches, ref, out)


def run_all(cfg: EvalConfig, d, benches: dict, ref, out: Path):
    """Every checkpoint on every benchmark at every budget; the outputs are rewritten after each run."""
    runs, records = [], []
    for ckpt in cfg.ckpt.split(","):
        model, tokenizer = load_model(ckpt, d.device)
        if d.rank == 0:
            print(f"attention: {attention_backend(d.device, next(model.parameters()).dtype)}", flush=True)
        for name, problems in benches.items():
            k = cfg.samples or samples_for(name)
            for B in [None] + cfg.budgets():
                res = evaluate(model, tokenizer, problems, k, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                               cfg.seed, limit=cfg.limit, system_prompt=cfg.system_prompt, budget=B,
                               answer_budget=cfg.answer_budget, ref=ref, max_batch=cfg.max_batch)
                records += [{"ckpt": ckpt, "data": name, "budget": B, **asdict(r)} for r in res.pop("records")]
                runs.append({"ckpt": ckpt, "data": name, "budget": B, "samples": k, **res})
                if d.rank == 0:  # after every run, so that a crash later keeps what is done
                    print(f"{ckpt} {name} B={B or '-'}: pass@1 {100 * res['accuracy']:.1f}% "
                          f"mean len {res['mean_length']:.0f} truncated {100 * res['truncation_rate']:.1f}% "
                          f"({res['seconds']:.0f}s)", flush=True)
                    md = write_outputs(out, cfg, runs, records)
        del model
    if d.rank == 0:
        print(md)


def write_outputs(out: Path, cfg: EvalConfig, runs: list[dict], records: list[dict]) -> str:
    """records.jsonl, eval.json and eval.md, each replaced whole; returns the Markdown."""
    md = ["# Evaluation", "", results_table(runs), ""]
    for name in dict.fromkeys(r["data"] for r in runs):
        md += [f"## Keywords: {name}", "", keyword_table([r for r in runs if r["data"] == name and r["budget"] is None]), ""]
    write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_json(out / "eval.json", {"config": asdict(cfg), "runs": runs})
    write_text(out / "eval.md", "\n".join(md))
    return "\n".join(md)


if __name__ == "__main__":
    main()
    distributed.cleanup()
