"""Benchmark of reward.py against math-verify: agreement with other verdicts, wrong answers accepted,
and speed. One JSON line; disagreements go to stderr.

    python bench/reward.py            # ~3-5 min on 2 cores, most of it math-verify's self-match pass

For ours (reward.score) and math-verify 0.9.0, on three case sets: shared/data/grader_cases.jsonl
(human verdicts), and the public test suites of math-verify and of NeMo-Skills
(tests/grader_suites.jsonl, each row with its repo, path, commit and test name):
1. agreement with each set's verdicts, and calls/s over it; calls/s over a typical integer-answer
   completion (training's common case);
2. wrong answers accepted: a case whose verdict is "different" that the checker accepts
   (false_verdicts; ours knowingly accepts the policy cases of tests/test_reward.py), and the wrong pairs of tests/test_reward.py (wrong_pairs): every right case's
   gold with its last digit changed, and completions a policy could learn to exploit;
3. self-match: every distinct gold of shared/data/*.jsonl against itself and against LaTeX
   re-spellings of itself (\\dfrac, \\left( \\right), spacing, \\frac12-style, thousands separators,
   and inside a completion's \\boxed{}): a checker that rejects a benchmark's own answer silently
   lowers accuracy. Failures are listed on stderr.
Each pred is graded as training grades a completion: ours via score(pred, gold, finished=True),
math-verify as its README recommends, verify(parse(gold), parse(pred)), gold first, each wrapped in
$...$ unless it already holds a $ (not \\$), \\(, \\[, \\boxed or </think> (it reads LaTeX only inside one).

Suite cases not imported (their verdict holds only under a non-default configuration): math-verify's
test_complex_math_expressions at float_rounding=2 (2 cases: rounded decimals accepted),
test_float_precision (precision=5), test_set_rel_assymetry with allow_set_relation_comp=True (2) and
test_strict_variable_comparison with strict=False; test_configs.py, test_string_extraction.py
(multiple-choice configs), test_timeout.py and test_raise_on_error.py test the API, not verdicts. NeMo-Skills'
test_math_equal asserts both orders, so each of its pairs is two cases; (0, None) is dropped.

math-verify runs in a subprocess of MV_PYTHON (default: this python, where it is installed for
comparison; another venv's python keeps its pins apart), so that ours is timed in a process that
never imports sympy, as in training.
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
sys.path.append(str(ROOT / "tests"))
import reward  # noqa: E402
from test_reward import EXPLOITS, _perturbed  # noqa: E402  (the wrong answers the tests reject)

DATA = Path(os.environ.get("THINKPRUNE_DATA", ROOT.parent / "shared" / "data"))
SUITES = ROOT / "tests" / "grader_suites.jsonl"
MV_PYTHON = os.environ.get("MV_PYTHON", sys.executable)
INT_COMPLETION = "<think>" + "Let me compute step by step. " * 100 + "</think>\nThe answer is $\\boxed{204}$."

# Runs in math-verify's python: reads {"pairs": [[gold, pred], ...]} on stdin, answers verdicts.
MV_CHILD = r"""
import json, re, sys, time
from math_verify import parse, verify
req = json.load(sys.stdin)
def env(s):
    return s if re.search(r"\\boxed|(?<!\\)\$|\\\(|\\\[|</think>", s) else "$" + s + "$"
out, t = [], time.perf_counter()
for gold, pred in req["pairs"]:
    try:
        out.append(bool(verify(parse(env(gold)), parse(env(pred)))))
    except Exception:
        out.append(False)
elapsed = time.perf_counter() - t
t = time.perf_counter()
for _ in range(req["int_reps"]):
    verify(parse("$204$"), parse(req["int_completion"]))
json.dump({"verdicts": out, "seconds": elapsed, "int_seconds": time.perf_counter() - t}, sys.stdout)
"""


def math_verify(pairs, int_reps=0):
    req = json.dumps({"pairs": pairs, "int_reps": int_reps, "int_completion": INT_COMPLETION})
    res = subprocess.run([MV_PYTHON, "-c", MV_CHILD], input=req, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout)


def ours(pairs, int_reps=0):
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


def self_match(check):
    """Distinct golds of every data file: (number, the wrong verdicts by kind of pair)."""
    golds = sorted({json.loads(line)["answer"] for f in sorted(DATA.glob("*.jsonl"))
                    if f.name != "grader_cases.jsonl" for line in f.open()})
    pairs = [(g, g, "itself") for g in golds] + \
        [(g, v, kind) for g in golds for kind, v in respellings(g).items()]
    verdicts = check([(g, v) for g, v, _ in pairs])
    fails = defaultdict(list)
    for (g, v, kind), ok in zip(pairs, verdicts):
        if not ok:
            fails[kind].append((g, v))
    return len(golds), fails


def main():
    suites = [json.loads(line) for line in SUITES.open()]
    sets = {"shared": [json.loads(line) for line in (DATA / "grader_cases.jsonl").open()],
            "math-verify suite": [c for c in suites if c["suite"] == "math-verify"],
            "nemo-skills suite": [c for c in suites if c["suite"] == "nemo-skills"]}
    wrong = [(_perturbed(c["gold"]), c["pred"]) for cases in sets.values() for c in cases
             if c["expected"] and _perturbed(c["gold"])] + [(g, p) for p, g in EXPLOITS]
    checkers = {"ours": ours, "math_verify": math_verify}
    out = {"cases": {k: len(v) for k, v in sets.items()}, "agreement": {}, "calls_per_s": {},
           "int_calls_per_s": {}, "wrong_accepted": {}, "self_match": {}}
    int_reps = {"ours": 2000, "math_verify": 200}
    for name, check in checkers.items():
        out["agreement"][name], out["calls_per_s"][name] = {}, {}
        false_accepts = 0
        for set_name, cases in sets.items():
            r = check([(c["gold"], c["pred"]) for c in cases])
            out["agreement"][name][set_name] = round(
                sum(v == c["expected"] for c, v in zip(cases, r["verdicts"])) / len(cases), 4)
            out["calls_per_s"][name][set_name] = round(len(cases) / r["seconds"], 1)
            for c, v in zip(cases, r["verdicts"]):
                false_accepts += v and not c["expected"]
                if v != c["expected"]:
                    print(f"[{name}] disagrees ({set_name}): expected={c['expected']} "
                          f"gold={c['gold'][-80:]!r} pred={c['pred'][-120:]!r}", file=sys.stderr)
        r = check(wrong, int_reps[name])
        out["int_calls_per_s"][name] = round(int_reps[name] / r["int_seconds"], 1)
        out["wrong_accepted"][name] = {"false_verdicts": false_accepts, "wrong_pairs": len(wrong),
                                       "wrong_pairs_accepted": sum(r["verdicts"])}
        for (g, p), v in zip(wrong, r["verdicts"]):
            if v:
                print(f"[{name}] accepts a wrong answer: gold={g!r} pred={p[-120:]!r}", file=sys.stderr)
        n, fails = self_match(lambda ps, check=check: check(ps)["verdicts"])
        out["self_match"][name] = {"golds": n, "failed": {k: len(v) for k, v in sorted(fails.items())}}
        for kind, lst in sorted(fails.items()):
            for g, v in lst[:20]:
                print(f"[{name}] self-match fails ({kind}): gold={g!r} as {v!r}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
