r"""The embedded task: a synthetic long-thinking problem set, its tokenizer, and a tiny Qwen2 SFT'd on
verbose reference traces, saved so that the rest of the pipeline cannot tell it from R1-Distill.

    python toy.py                          # builds runs/toy/{base/, data/{train,val,test}.jsonl} if absent,
                                           # then measures the base on the test set (T=0.6, as demo.py)
    python toy.py --out=runs/demo --steps=300 --hidden_size=96    # any ToyConfig field as --key=value

The task: "Start at 47 and add 8, five times, keeping the last two digits. What do you get?" (1 to 12
steps: the difficulty). A written step ("three: 63+8=71.", counted down to "one" so that where to stop is
plain) is a small sum; the answer of k steps at once is never shown, so the written steps are necessary.
The reference thinker has a blind spot: on a step whose ones digits make exactly 10 with a digit of 7 or
more ("63+7"), it drops the carry ("=60.") with probability `p_slip` (0.9), unnoticed: a rule learned as the
likely value, not a rare random slip whose survival at T=0.6 varies by build; the traces with the right
value leave RL accuracy to gain.

Choices:
- The traces (`write_trace`) waste tokens the way long thinkers do, each with a probability in
  `TraceStyle`: an opening restatement, re-checks of a step, a wrong value then "Wait, that's wrong.",
  and a final check of the last step ("Wait, let me verify the last step again: 63+8=71. Yes, 71."); then
  "</think>" and "**Final Answer:**\n\n$\boxed{5}$", exactly the cue budget forcing appends. Every
  redundant line copies from the line before it, never from far back: a redo of the whole chain (tried,
  README) made builds differ by which far copy each had learned. `minimal_trace` is what a perfect pruner
  would write.
- The tokenizer is byte-level BPE with every digit its own token (as Qwen's): lengths are counted in
  tokens and prompts carry ThinkPrune's system prompt, so words should be short. <think> and </think>
  are added, not special (as in R1-Distill); the chat template ends with "<|assistant|><think>\n".
- SFT prompts come from data.build_prompt, as in RL. A quarter carry the limit system prompt with a generous
  random limit: familiar text that does not change the output, so only the cutoff reward teaches brevity.
  The loss covers the assistant part, EOS included.
Files: {out}/base/ (an HF checkpoint dir plus toy_config.json), {out}/data/{train,val,test}.jsonl (rows
with difficulty = steps and necessary_length = the minimal trace's tokens + EOS; val and test disjoint from
train, from each other and from the SFT problems, the same for every seed), {out}/sft_metrics.jsonl.
"""

import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from config import check, load_config
from data import INSTRUCTION, SYSTEM_PROMPT, build_prompt, load_problems
from eval import evaluate
from model import ModelArgs, Transformer

# ---- the task -------------------------------------------------------------------------------------------

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen")
PROBLEM = "Start at {start} and add {add}, {k}, keeping the last two digits. What do you get?"
PROBLEM_RE = re.compile(r"Start at (\d\d) and add (\d), (\w+) times?, keeping the last two digits\. What do you get\?")


def parse_problem(text: str) -> tuple[int, int, int]:
    """-> (start, add, k): the two-digit start, the digit added at each step, the number of steps."""
    m = PROBLEM_RE.fullmatch(text)
    if not m or m.group(3) not in WORDS[1:] or m.group(2) == "0":
        raise ValueError(f"not a toy problem: {text!r}")
    return int(m.group(1)), int(m.group(2)), WORDS.index(m.group(3))


def problem_text(start: int, add: int, k: int) -> str:
    return PROBLEM.format(start=f"{start:02d}", add=add, k=WORDS[k] + (" times" if k > 1 else " time"))


def make_problems(n: int, seed: int, min_steps: int = 1, max_steps: int = 12, split: str = "train",
                  exclude: set[str] = frozenset()) -> list[dict]:
    """n problems, none in `exclude`, as benchmark rows {id, problem, answer (two digits), difficulty (the
    number of steps), source}: the space (100 starts x 9 digits x the step counts) shuffled, distinct until
    it runs out, then repeated in the same order."""
    rng = random.Random(seed)
    space = [(start, add, k) for k in range(min_steps, max_steps + 1) for add in range(1, 10) for start in range(100)]
    rng.shuffle(space)
    pool = [(text, p) for p in space if (text := problem_text(*p)) not in exclude]
    if not pool:
        raise ValueError(f"make_problems: every problem of {min_steps}-{max_steps} steps is excluded")
    rows = []
    for i in range(n):
        problem, (start, add, k) = pool[i % len(pool)]
        rows.append({"id": f"toy-{split}-{i:05d}", "problem": problem, "answer": f"{(start + k * add) % 100:02d}",
                     "difficulty": k, "source": f"toy.py:make_problems(seed={seed})"})
    return rows


@dataclass
class TraceStyle:
    """How the reference thinker writes: the probabilities of each kind of wasted text, and of a slip."""
    p_open: float = 0.5  # an opening sentence restating the plan
    p_check: float = 0.8  # after a correct step, re-check it ("Wait, let me check: 63+8=71. Yes.")
    p_wrong: float = 0.1  # write a wrong value first, then "Wait, that's wrong." and the right one
    p_verify: float = 0.8  # at the end, check the last step again ("...again: 55+8=63. Yes, 63.")
    p_slip: float = 0.0  # on a blind-spot step (`blind_spot`), drop the carry ("63+7=60.") and go on, unnoticed


def blind_spot(s: int, add: int) -> bool:
    """The steps where the reference thinker may drop the carry: ones digits that make exactly 10, add >= 7."""
    return add >= 7 and s % 10 + add == 10


def write_trace(problem: str, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """The completion after the prompt's "<think>\\n": steps, re-checks, corrections, then the answer. Steps
    count down ("five: ...", "four: ...", ..., "one: ..."), so where to stop is never in doubt."""
    start, add, k = parse_problem(problem)
    s, out = start, []
    if rng.random() < style.p_open:
        out.append(f"Okay, I start at {s:02d} and add {add}, {WORDS[k]} times. I count the steps down.\n")

    def step(i: int, s: int, v: int) -> str:  # step i (counted down) from s, written with value v
        return f"{WORDS[i]}: {s:02d}+{add}={v:02d}.\n"

    for i in range(k, 0, -1):
        r = (s + add) % 100
        if blind_spot(s, add) and rng.random() < style.p_slip:
            r = s // 10 * 10  # the carry dropped: 63+7=60
            out.append(step(i, s, r))
        elif rng.random() < style.p_wrong:
            w = rng.choice([v for v in range(100) if v != r and v // 10 in (r // 10, (r // 10 + 9) % 10)])
            out.append(step(i, s, w) + "Wait, that's wrong. " + step(i, s, r))
        else:
            out.append(step(i, s, r))
            if rng.random() < style.p_check:
                out.append(rng.choice([f"Wait, let me check: {s:02d}+{add}={r:02d}. Yes.\n",
                                       f"Wait, let me double-check {s:02d}+{add}: {r:02d}. Right.\n"]))
        last = f"{s:02d}+{add}={r:02d}"
        s = r
    if rng.random() < style.p_verify:
        out.append(f"Wait, let me verify the last step again: {last}. Yes, {s:02d}.\n")
    out.append(f"</think>\n\n**Final Answer:**\n\n$\\boxed{{{s:02d}}}$")
    return "".join(out)


def minimal_trace(problem: str) -> str:
    """The shortest trace that still does every step: what a perfectly pruned model would write."""
    return write_trace(problem, random.Random(0), TraceStyle(0, 0, 0, 0, 0))


# ---- the tokenizer --------------------------------------------------------------------------------------

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]  # pad first: the sampler pads with 0
THINK = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


def build_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE learned on `corpus`, every digit its own token (as Qwen's tokenizer does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d"), "isolated"),
                                                 pre_tokenizers.Punctuation("isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # like R1-Distill's: added but not special, so decoding with skip_special_tokens keeps them
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK])
    return tok


def save_tokenizer(tok: Tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
           "model_max_length": 1024, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# ---- SFT ------------------------------------------------------------------------------------------------

SORT_BATCHES = 8  # batches cut from one length-sorted run of rows


@dataclass
class ToyConfig:
    out: str = "runs/toy"
    min_steps: int = 1  # difficulty: the number of steps, drawn uniformly from [min_steps, max_steps]
    max_steps: int = 12
    p_slip: float = 0.9  # how often the reference thinker drops the carry on a blind-spot step: the base's errors
    n_train: int = 10000  # RL problems (the rest of the 10,800); the SFT draws its own, none from val or test
    n_val: int = 200
    n_test: int = 500
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 320
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    steps: int = 800  # the README's three builds of this task
    batch_size: int = 16
    lr: float = 3e-3
    init_std: float = 0.08  # chosen on the previous task (the README's history), where 0.02 sat at chance longer
    warmup: int = 50
    p_limit: float = 0.25  # share of SFT prompts that carry the RL system prompt, with a generous limit
    seed: int = 0
    threads: int = 2

    def check(self):
        for key in ("n_train", "n_val", "n_test", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "steps", "batch_size",
                    "warmup", "threads"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              self.num_key_value_heads, "must divide num_attention_heads")
        check(1 <= self.min_steps <= self.max_steps < len(WORDS), "max_steps", (self.min_steps, self.max_steps),
              f"need 1 <= min_steps <= max_steps <= {len(WORDS) - 1}")
        check(0 <= self.p_slip <= 1, "p_slip", self.p_slip, "a probability in [0, 1]")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        check(0 <= self.p_limit <= 1, "p_limit", self.p_limit, "a probability in [0, 1]")


def sft_batches(tokenizer, rows: list[dict], rng: random.Random, cfg: ToyConfig, style: TraceStyle):
    """Yield (x (B, T), loss mask (B, T) over the completion): prompt + trace + EOS, right-padded. Each run of
    `SORT_BATCHES` batches is cut from its rows sorted by length, then shuffled: lengths vary ~10x (1 to
    12 steps, some prompts with the long system turn), and a batch of similar lengths hardly pads."""
    n = cfg.batch_size * SORT_BATCHES
    for i in range(0, len(rows), n):
        seqs = []
        for row in rows[i:i + n]:
            limit = rng.randint(400, 4000) if rng.random() < cfg.p_limit else None
            p = build_prompt(tokenizer, row["problem"], limit, SYSTEM_PROMPT)
            c = tokenizer.encode(write_trace(row["problem"], rng, style), add_special_tokens=False)
            seqs.append((p + c + [tokenizer.eos_token_id], len(p)))
        seqs.sort(key=lambda sp: len(sp[0]))
        batches = [seqs[j:j + cfg.batch_size] for j in range(0, len(seqs), cfg.batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            x = torch.zeros(len(batch), max(len(s) for s, _ in batch), dtype=torch.long)
            mask = torch.zeros_like(x, dtype=torch.bool)
            for r, (s, start) in enumerate(batch):
                x[r, :len(s)] = torch.tensor(s)
                mask[r, start:len(s)] = True
            yield x, mask


def build(cfg: ToyConfig) -> Path:
    """Write {out}/data/{train,val,test}.jsonl and the SFT'd base in {out}/base; return the base dir."""
    torch.set_num_threads(cfg.threads)
    out, rng = Path(cfg.out), random.Random(cfg.seed)
    steps = (cfg.min_steps, cfg.max_steps)
    # the held-out sets do not depend on cfg.seed: builds of different seeds are scored on one benchmark
    test = make_problems(cfg.n_test, 2, *steps, split="test")
    val = make_problems(cfg.n_val, 1, *steps, split="val", exclude={r["problem"] for r in test})
    held_out = {r["problem"] for r in test + val}
    train = make_problems(cfg.n_train, cfg.seed, *steps, split="train", exclude=held_out)
    style = TraceStyle(p_slip=cfg.p_slip)
    base = out / "base"
    corpus = [write_trace(r["problem"], rng, style) for r in train[:2000]] + [r["problem"] + " " + INSTRUCTION
                                                                      for r in train[:2000]]
    save_tokenizer(build_tokenizer(corpus + [SYSTEM_PROMPT] * 100, cfg.vocab_size), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", test)):
        for r in rows:  # what a perfectly pruned model writes: the minimal trace and EOS, in tokens
            r["necessary_length"] = len(tokenizer.encode(minimal_trace(r["problem"]), add_special_tokens=False)) + 1
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    args = ModelArgs(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     tie_word_embeddings=True, max_position_embeddings=1024,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Transformer(args).init_weights(std=cfg.init_std, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}", flush=True)
    sft_rows = make_problems(cfg.steps * cfg.batch_size, cfg.seed + 3, *steps, split="sft", exclude=held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log = open(out / "sft_metrics.jsonl", "w")
    t0 = time.time()
    batches = sft_batches(tokenizer, sft_rows, rng, cfg, style)
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, mask = next(batches)
        logits = model(x[:, :-1])  # (B, T-1, V) predicts x[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        loss = (nll * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "lr": lr,
                              "seconds": round(time.time() - t0, 2)}) + "\n")
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    log.close()
    model.save_pretrained(base)
    (base / "toy_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return base


def ensure_base(cfg: ToyConfig) -> Path:
    """The base in {out}/base: built if absent, reused if it was built with these settings, else an error
    (a rerun with other settings must not silently measure the old model)."""
    base = Path(cfg.out) / "base"
    made = base / "toy_config.json"  # build() writes it last: its presence means the base is complete
    if not made.is_file():
        t0 = time.time()
        build(cfg)
        print(f"built {base} in {time.time() - t0:.0f}s", flush=True)
        return base
    ignore = ("out", "threads")  # where and how fast, not what
    old = {k: v for k, v in json.loads(made.read_text()).items() if k not in ignore}
    now = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    if old != now:
        diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
        raise ValueError(f"{made}: the base was built with other settings (was, now): {diff}; "
                         f"use another output directory or delete {base}")
    return base


# ---- measuring the base ---------------------------------------------------------------------------------

def report(base: Path, problems: list[dict], temperature: float, max_new_tokens: int = 640) -> dict:
    """Accuracy, length and "Wait"s of the base on `problems`, then budget forcing at half its mean length."""
    model, tokenizer = Transformer.from_pretrained(base, device="cpu"), AutoTokenizer.from_pretrained(base)
    floor = [len(tokenizer.encode(minimal_trace(p["problem"]), add_special_tokens=False)) + 1 for p in problems]
    print(f"necessary length (minimal trace + EOS): mean {sum(floor) / len(floor):.1f}, "
          f"min {min(floor)}, max {max(floor)} tokens", flush=True)
    kw = dict(samples=1, temperature=temperature, top_p=0.95 if temperature else 1.0, seed=0)
    res = evaluate(model, tokenizer, problems, max_new_tokens=max_new_tokens, **kw)
    B = int(res["mean_length"] / 2)
    forced = evaluate(model, tokenizer, problems, max_new_tokens=max_new_tokens, budget=B, answer_budget=16, **kw)
    for name, r in (("base", res), (f"budget forcing at B={B}", forced)):
        print(f"{name}: accuracy {100 * r['accuracy']:.1f}%, mean length {r['mean_length']:.1f}, "
              f"p90 length {sorted(x.length for x in r['records'])[int(0.9 * len(r['records']))]}, "
              f"Wait/completion {r['keywords']['Wait']['per_completion']:.2f}, "
              f"truncated {100 * r['truncation_rate']:.1f}% ({r['seconds']:.0f}s)", flush=True)
    return {"base": res, "forced": forced, "budget": B}


if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:], ToyConfig)
    base = ensure_base(cfg)
    torch.set_num_threads(cfg.threads)
    report(base, load_problems(Path(cfg.out) / "data" / "test.jsonl"), temperature=0.6)
