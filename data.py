"""
Problem files in; prompt token ids, stop tokens, problem order and seeds out.

    rows = load_problems("../shared/data/train.jsonl")         # [{"id", "problem", "answer", ...}, ...]
    ids = build_prompt(tokenizer, rows[0]["problem"], limit=4000, system_prompt=SYSTEM_PROMPT)
    eos = eos_ids(tokenizer, model.args.eos_token_id)           # every id that ends a completion
    idx = batch_indices(len(rows), 128, seed, start=step * 128)  # the problems of a training step

Choices:
- A problem file is JSONL, one object per line with non-empty string `problem` and `answer` (an answer
  given as a JSON number, as user files often do, becomes its string: 42 -> "42", 0.5 -> "0.5"). Rows
  without an `id` get "<file stem>-<line>"; ids become strings and must be unique (evaluation averages
  per problem by id, so two problems under one id would be merged). Parquet (same columns) is read when
  pyarrow is installed. A bad row stops the run with `file:line: key ...`: a silently skipped row would
  change the data order. A row may carry an integer `limit`, its own token limit in training (the
  prompt's stated limit and the cutoff; DLER's difficulty-aware truncation).
- The prompt is the model's own chat template (`add_generation_prompt=True`), so R1-Distill gets its
  `<｜User｜>...<｜Assistant｜><think>\\n` wrapper. The user turn is the problem plus the instruction
  ThinkPrune's official code uses for DeepSeek models. With a limit, a system turn carries
  `system_prompt` with "{L}" filled in, as the official code does. With `limit=None` there is no system
  turn at all: a limit-free prompt is the model's native prompt, which is what the base model was
  distilled on (the evaluation of an unconstrained model uses this).
- Dropping prompts that are too long happens in train.py (it knows max_prompt_tokens and logs the count).
- Randomness is a pure function of integers: `seed_for(seed, step, ...)` mixes them into one seed, so
  the problem order of a step and the samples of a prompt do not depend on what ran before, on the
  batch they share or on the number of ranks; a resumed run sees exactly what the killed one would have.
"""

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

# the shared benchmark files: ../shared/data beside the repo, or wherever THINKPRUNE_DATA points
DATA_DIR = Path(os.environ.get("THINKPRUNE_DATA", Path(__file__).resolve().parent.parent / "shared" / "data"))
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
# ThinkPrune's official system prompt (its data-prep script), with the limit sentence it appends.
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think></think> and "
    "<answer></answer> tags, respectively, i.e., <think> reasoning process here</think><answer> answer "
    "here</answer>. The output of the assistant should be within {L} tokens.")


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" in row and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool) or row["id"] == ""):
        raise ValueError(f"{where}: key 'id' must be a non-empty string or an integer, got {row['id']!r}")
    for key in ("problem", "answer"):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and key == "answer" and math.isfinite(v):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {v!r}")
        row[key] = v
    if "limit" in row and (not isinstance(row["limit"], int) or isinstance(row["limit"], bool) or row["limit"] < 1):
        raise ValueError(f"{where}: key 'limit' (this problem's token limit) must be an integer >= 1, "
                         f"got {row['limit']!r}")
    return row


def load_problems(path) -> list[dict]:
    """Rows of a .jsonl (or .parquet, with pyarrow) file, each with id, problem, answer (str)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such problem file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        records = pq.read_table(path).to_pylist()
        lines = [(i + 1, r) for i, r in enumerate(records)]  # "line" = 1-based row number
    else:
        lines = []
        # split at "\n" only: str.splitlines would also split at U+2028 etc., which JSON strings may hold
        for i, text in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not text.strip():
                continue
            try:
                lines.append((i, json.loads(text)))
            except ValueError as e:  # a JSONDecodeError, or an integer too long to convert
                raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
    rows, line_of = [], {}  # line_of: id -> the line that first used it
    for i, row in lines:
        row = _check_row(row, f"{path}:{i}")
        row["id"] = str(row.get("id", f"{path.stem}-{i}"))
        if row["id"] in line_of:
            raise ValueError(f"{path}:{i}: id {row['id']!r} is already used on line {line_of[row['id']]}")
        line_of[row["id"]] = i
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no problems in the file")
    return rows


def build_prompt(tokenizer, problem: str, limit: int | None, system_prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant's generation prompt."""
    messages = [{"role": "user", "content": problem + " " + INSTRUCTION}]
    if limit is not None:
        messages.insert(0, {"role": "system", "content": system_prompt.replace("{L}", str(limit))})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding (input_ids + attention_mask); older versions a plain list
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(t) for t in ids]


def eos_ids(tokenizer, model_eos) -> list[int]:
    """Every id that ends a completion: the model config's eos_token_id (an int, a list or None) and the
    tokenizer's (R1-Distill's config and tokenizer name different ones)."""
    ids = set([model_eos] if isinstance(model_eos, int) else model_eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def seed_for(*parts: int) -> int:
    """One seed from several integers (run seed, step, a prompt's place, ...), in [0, 2**63)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % 2**63
    return s


def batch_indices(n: int, count: int, seed: int, start: int) -> list[int]:
    """`count` problem indices from position `start` of the run's order: a seeded permutation of the n
    problems per epoch, epochs one after another (training takes consecutive slices)."""
    out, pos = [], start
    while len(out) < count:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
        take = perm[i:i + count - len(out)].tolist()
        out += take
        pos += len(take)
    return out
