"""Benchmark of reward.py against math-verify: agreement with human verdicts, and speed. One JSON line.

    python bench/reward.py            # ~2-5 min on 2 cores, most of it math-verify's self-match pass

What it measures, for ours (reward.score) and for math-verify 0.9.0:
1. agreement with the `expected` verdicts of shared/data/grader_cases.jsonl, per category and overall;
   each pred is graded as training grades a completion: ours via score(pred, gold, finished=True),
   math-verify as its README recommends, verify(parse(gold), parse(pred)), the order mattering, with
   the gold in a $...$ LaTeX environment (it only reads LaTeX inside one) and so is a bare-answer
   pred (one with no \\boxed, $ or </think>);
2. calls/s over those cases, and over a typical integer-answer completion (training's common case);
3. self-match: every distinct gold of shared/data/*.jsonl against itself and against LaTeX
   re-spellings of itself (\\dfrac, \\left( \\right), spacing, \\frac12-style, thousands separators,
   and inside a completion's \\boxed{}): a checker that rejects a benchmark's own answer silently
   lowers accuracy; and, the other way, each gold with its last digit changed (d -> d+1 mod 10),
   which should be rejected. Failures are listed on stderr.

math-verify's pins must not enter our environment, so it lives in its own venv (MV_VENV, default
/tmp/mv-venv), created here on first run with pip, and is called in a subprocess that reads JSON.
"""
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

DATA = Path(os.environ.get("THINKPRUNE_DATA", ROOT.parent / "shared" / "data"))
MV_VENV = Path(os.environ.get("MV_VENV", "/tmp/mv-venv"))
MV_PIN = "math-verify[antlr4_13_2]==0.9.0"
INT_COMPLETION = "<think>" + "Let me compute step by step. " * 100 + "</think>\nThe answer is $\\boxed{204}$."

# Runs inside the math-verify venv: reads {"pairs": [[gold, pred], ...]} on stdin, answers verdicts.
MV_CHILD = r'''
import json, sys, time
from math_verify import parse, verify
req = json.load(sys.stdin)
def env(s):
    return s if ("\\boxed" in s or "$" in s or "</think>" in s) else "$" + s + "$"
out, t = [], time.perf_counter()
for gold, pred in req["pairs"]:
    try:
        out.append(bool(verify(parse("$" + gold + "$"), parse(env(pred)))))
    except Exception:
        out.append(False)
elapsed = time.perf_counter() - t
t = time.perf_counter()
for _ in range(req["int_reps"]):
    verify(parse("$204$"), parse(req["int_completion"]))
json.dump({"verdicts": out, "seconds": elapsed, "int_seconds": time.perf_counter() - t}, sys.stdout)
'''


def math_verify(pairs, int_reps):
    py = MV_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {MV_VENV} with {MV_PIN}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(MV_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", MV_PIN], check=True)
    req = json.dumps({"pairs": pairs, "int_reps": int_reps, "int_completion": INT_COMPLETION})
    res = subprocess.run([str(py), "-c", MV_CHILD], input=req, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout)


def ours(pairs, int_reps):
    reward.is_equiv("\\sqrt{2}", "2^{1/2}")  # start the worker: a one-off cost, not per call
    t = time.perf_counter()
    out = [reward.score(pred, gold, finished=True) == 1.0 for gold, pred in pairs]
    elapsed = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(int_reps):
        reward.score(INT_COMPLETION, "204", True)
    return {"verdicts": out, "seconds": elapsed, "int_seconds": time.perf_counter() - t}


def respellings(g):
    """Ways a model could write the same answer g."""
    out = {"boxed in a completion": "<think>ok</think>\nThe final answer is $\\boxed{%s}$." % g}
    if "\\frac" in g:
        out["dfrac"] = g.replace("\\frac", "\\dfrac")
        short = re.sub(r"\\frac\{(\d)\}\{(\d)\}", r"\\frac\1\2", g)
        if short != g:
            out["frac12"] = short
    if re.search(r"(?<!\\)[(\[]", g) and "\\left" not in g:
        out["left/right"] = re.sub(r"(?<!\\)([(\[])", r"\\left\1", re.sub(r"(?<!\\)([)\]])", r"\\right\1", g))
    spaced = re.sub(r"\s*([,=+])\s*", r" \1 ", g).strip()
    if spaced != g:
        out["spacing"] = spaced
    if re.fullmatch(r"\d{4,}", g):
        out["thousands"] = re.sub(r"(?<=\d)(?=(\d{3})+$)", ",\\!", g)
    out["displaystyle"] = "\\displaystyle " + g
    return out


def perturbed(g):
    """g with its last digit changed: a different answer (bar units' exponents and \\approx tails)."""
    m = list(re.finditer(r"\d", g))
    if not m:
        return None
    i = m[-1].start()
    return g[:i] + str((int(g[i]) + 1) % 10) + g[i + 1:]


def self_match(check):
    """Distinct golds of every data file: (number, the wrong verdicts by kind of pair)."""
    golds = sorted({json.loads(line)["answer"] for f in sorted(DATA.glob("*.jsonl"))
                    if f.name != "grader_cases.jsonl" for line in f.open()})
    pairs = [(g, g, "itself", True) for g in golds] + \
        [(g, v, kind, True) for g in golds for kind, v in respellings(g).items()] + \
        [(g, perturbed(g), "perturbed (accepted)", False) for g in golds if perturbed(g)]
    verdicts = check([(g, v) for g, v, _, _ in pairs])
    fails = defaultdict(list)
    for (g, v, kind, expected), ok in zip(pairs, verdicts):
        if ok != expected:
            fails[kind].append((g, v))
    return len(golds), fails


def agreement(cases, verdicts):
    hits, totals = defaultdict(int), defaultdict(int)
    for c, v in zip(cases, verdicts):
        for key in (c["category"], "all"):
            totals[key] += 1
            hits[key] += v == c["expected"]
    return {k: round(hits[k] / totals[k], 4) for k in sorted(totals)}


def main():
    cases = [json.loads(line) for line in (DATA / "grader_cases.jsonl").open()]
    pairs = [(c["gold"], c["pred"]) for c in cases]
    int_reps = 2000
    res = {"ours": ours(pairs, int_reps), "math_verify": math_verify(pairs, int_reps // 10)}
    reps = {"ours": int_reps, "math_verify": int_reps // 10}
    out = {"cases": len(cases), "agreement": {}, "calls_per_s": {}, "int_calls_per_s": {},
           "self_match": {}}
    for name, r in res.items():
        out["agreement"][name] = agreement(cases, r["verdicts"])
        out["calls_per_s"][name] = round(len(cases) / r["seconds"], 1)
        out["int_calls_per_s"][name] = round(reps[name] / r["int_seconds"], 1)
        for c, v in zip(cases, r["verdicts"]):
            if v != c["expected"]:
                print(f"[{name}] disagrees: {c['category']} expected={c['expected']} "
                      f"gold={c['gold']!r} pred={c['pred'][-120:]!r}", file=sys.stderr)
    checks = {"ours": lambda ps: [reward.is_equiv(p, g) if not p.startswith("<think>")
                                  else reward.score(p, g, True) == 1.0 for g, p in ps],
              "math_verify": lambda ps: math_verify(ps, 0)["verdicts"]}
    for name, check in checks.items():
        n, fails = self_match(check)
        out["self_match"][name] = {"golds": n, "failed": {k: len(v) for k, v in sorted(fails.items())}}
        for kind, lst in sorted(fails.items()):
            for g, v in lst[:20]:
                print(f"[{name}] self-match fails ({kind}): gold={g!r} as {v!r}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
