"""Tests of reward.py: each normalisation / comparison rule with the answer pair that needs it, the
shared answer-equivalence cases, extraction, the cutoff rule, and the time bound on hostile input."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import reward

DATA = Path(os.environ.get("THINKPRUNE_DATA",
                           Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
CASES = DATA / "grader_cases.jsonl"
BOUND = reward.TIMEOUT + 1.0  # the timeout, plus a kill and the scheduling slack of a 2-core box

# (gold, pred) pairs of grader_cases.jsonl we still get wrong, with the reason. Empty today.
KNOWN_FAILURES = {}


def _cases():
    if not CASES.exists():
        return []
    return [json.loads(line) for line in CASES.open()]


@pytest.mark.skipif(not CASES.exists(), reason=f"shared data absent: {CASES} (set THINKPRUNE_DATA)")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["category"])
def test_grader_cases(case):
    """Every human verdict in the shared cases, with the completion graded as training grades it."""
    got = reward.score(case["pred"], case["gold"], finished=True) == 1.0
    if (case["gold"], case["pred"]) in KNOWN_FAILURES:
        pytest.xfail(KNOWN_FAILURES[(case["gold"], case["pred"])])
    assert got == case["expected"], case["note"]


# Each rule, with the pair that shows why it is there. (pred, gold, expected)
RULES = [
    # normalisation
    ("\\dfrac{17}{50}", "\\frac{17}{50}", True),          # \dfrac / \tfrac are \frac
    ("\\frac 59", "\\frac{5}{9}", True),                   # \frac59 without braces
    ("\\frac{270}7", "\\frac{270}{7}", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}", True),        # ... also nested
    ("1{,}000", "1000", True),                             # {,} is a thousands separator
    ("\\varnothing", "\\emptyset", True),
    ("\\mathbb{R}", "(-\\infty,\\infty)", True),
    ("\\text{no}", "\\text{No}", True),                    # words: case ignored
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),  # \left / \right
    ("10,\\!080", "10080", True),                          # ,\! is a thousands separator
    ("32,348", "32348", True),                             # so is a comma in a whole number
    ("x=1,000", "1000", True),                             # ... also after a name
    ("n = 12,345", "12345", True),
    ("\\$18.90", "18.9", True),                            # dollars, trailing zero
    ("62.5\\%", "62.5", True),                             # percent sign dropped
    ("90^\\circ", "90", True),                             # degrees dropped
    ("120°", "120^{\\circ}", True),
    ("864 \\text{ square inches}", "864", True),          # a trailing \text{} is a unit
    ("8.7 \\times 10^{8} \\text{ cm}", "8.7e8", True),
    ("20 degrees", "20", True),                            # plain unit words
    ("\\text{Evelyn}", "Evelyn", True),                   # a whole-answer \text{} is unwrapped
    ("\\text{(C)}", "C", True),                           # a multiple-choice letter
    ("52_8", "52", True),                                  # base subscript: the digits were asked
    ("52_8", "42", False),                                 # ... not their decimal value
    ("025", "25", True),                                   # AIME's three-digit form
    ("4.\\overline{6}", "\\frac{14}{3}", True),           # repeating decimal
    ("np.arcsin(10/13)", "\\arcsin\\left(\\frac{10}{13}\\right)", True),  # numpy spelling
    ("\\sin^{-1}(10/13)", "\\arcsin(10/13)", True),
    ("\\displaystyle \\frac {3} {2}", "\\frac32", True),  # display commands and spacing
    ("(2, +\\infty)", "(2,\\infty)", True),               # a leading + sign
    ("(2, ∞)", "(2,\\infty)", True),                      # unicode
    # numbers: exact
    ("116.0", "116", True),
    ("0.3888", "\\frac{243}{625}", True),                 # an exact decimal is the fraction
    ("4.67", "\\frac{14}{3}", False),                     # a rounded decimal is not
    ("15.56", "11\\sqrt2", False),
    ("3.14159265358979", "\\pi", False),
    ("137.5", "137 \\frac{1}{2}", True),                  # mixed numbers
    ("\\frac{137}{2}", "137 \\frac{1}{2}", False),
    ("45 \\times 10^{32}", "4.5e33", True),               # scientific notation
    ("10^{-5}", "1e-5", True),
    ("-1/3", "-1./3", True),
    ("2^{1009}+1", "2^{1009}", False),                    # a relative tolerance is not enough
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False),       # ... nor an absolute one
    ("\\frac23", "\\$\\dfrac23 \\approx \\$0.67", True),    # the exact value before \approx
    ("8.24", "\\approx 8.24 \\text{ mph}", True),             # ... or the approximation alone
    ("12_6", "12_5", False),                               # two bases must agree
    # symbolic
    ("\\sqrt{117}", "3\\sqrt{13}", True),
    ("\\frac{1}{2+\\sqrt{3}}", "2-\\sqrt{3}", True),
    ("6!", "720", True),
    ("\\frac{(2n)!}{(n!)^2}", "\\binom{2n}{n}", True),    # free symbols: checked at fixed points
    ("mn-\\lceil m/2\\rceil", "m n-\\lfloor m / 2\\rfloor", False),
    ("\\lfloor\\frac{2n-1}{6}\\rfloor", "\\lfloor\\frac{2 n-1}{5}\\rfloor", False),  # points of several sizes
    ("m_p c^2(\\gamma^2-1)", "m_{p} c^{2}\\left(\\gamma^{2}-1\\right)", True),  # \gamma is a variable ...
    ("\\gamma", "0.5772156649015329", False),              # ... not Euler's constant
    ("x", "|x|", False),                                   # a negative point ...
    ("x", "\\sqrt{x^2}", False),
    ("x", "\\max(x,0)", False),
    ("2a", "2|a|", False),
    ("x-1", "|x-1|", False),                               # ... and one in (0, 1)
    ("\\frac{\\cos x}{\\sin x}", "\\cot x", True),
    ("-5i+6", "6 - 5i", True),                            # i is the imaginary unit
    ("\\frac{1-i}{4}e^{2it}", "\\frac{e^{2 i t}}{(2+2 i)}", True),
    ("even", "neve", False),                               # words are text, not products
    ("-\\infty", "\\infty", False),
    # structure
    ("-2, 1", "1,-2", True),                               # several answers: order ignored
    ("1", "1,-2", False),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}", True),  # ± is both signs
    ("(\\pm 3, \\pm 2)", "(3,2),(-3,2),(3,-2),(-3,-2)", True),
    ("\\{-2, 1+\\sqrt{5}, 1-\\sqrt{5}\\}", "\\{1\\pm\\sqrt{5},-2\\}", True),  # sets
    ("(-29,15)", "(15,-29)", False),                       # tuples are ordered
    ("(3,4)", "(3,4]", False),                             # open vs closed ends
    ("(9,36) \\cup (0,9)", "(0,9) \\cup (9,36)", True),   # unions: order ignored
    ("\\{1\\}\\cup\\{2\\}", "\\{2\\}\\cup\\{1\\}", True),    # a union of sets: their elements
    ("\\{1\\}\\cup\\{2\\}", "\\{1,2\\}", True),
    ("\\{1\\}\\cup\\{2\\}", "\\{1\\}", False),
    ("(0,36)", "(0,9) \\cup (9,36)", False),
    ("3 < \\lambda \\le 4", "(3,4]", True),               # inequalities are intervals
    ("-2 \\le x \\le 7", "x \\in [-2,7]", True),          # "x \in S" is S
    ("x > 2", "(2, \\infty)", True),
    ("(0,4]", "t(0,4]", True),                             # a stray name before a half-open interval
    ("(-18, -49, 96)", "\\begin{pmatrix} -18 \\\\ -49 \\\\ 96 \\end{pmatrix}", True),  # vectors
    ("\\frac{1}{3}\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", True),
    ("\\begin{bmatrix} 0 & -1 \\\\ -1 & 0 \\end{bmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", False),
    ("5", "x=5", True),                                    # a named value is its value
    ("f(x) = x", "f(x)=2 x", False),
    ("f^{-1}(x) = \\frac{x-1}{2}", "\\frac{x-1}{2}", True),
    ("(1, -1)", "(x, y) = (1, -1)", True),                 # a tuple of names is a name
    ("\\dot{x}=kx-a", "\\frac{d x}{d t}=k x-a", True),
    ("SRMC=MR", "MR=SRMC", True),                          # equations: sides may swap
    ("2x - y + 3 = 0", "y = 2x + 3", False),               # a name on the left is a value ...
    ("y - 2x - 3 = 0", "-y + 2x + 3 = 0", True),           # ... other equations agree up to sign
    ("x=1, x=5", "x=5", False),
    ("a=2, h=-1, k=-18", "2,-1,-18", True),
    ("a=1, b=2", "a=2, b=1", False),                       # both sides named: names pair values
    ("a=1, b=2", "b = 2, a = 1", True),
    ("x=1, y=2", "1, 2", True),                            # one side named: names ignored
    # malformed
    ("", "104", False),
    ("\\frac{14}{", "\\frac{14}{3}", False),
    ("(3,", "(3,4]", False),
    ("None", "1,-2", False),
]


@pytest.mark.parametrize("pred,gold,expected", RULES)
def test_rule(pred, gold, expected):
    assert reward.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("text,answer", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),                   # nested braces
    ("hence $\\boxed 9$.", "9"),                                      # \boxed without braces
    ("$\\fbox{18}$ digits", "18"),
    ("$\\boxed{1}$. Hmm, no: $\\boxed{2}$", "2"),                     # the last box
    ("<think>so \\boxed{3}</think> The answer is $\\boxed{4}$.", "4"),  # after </think>
    ("<think>so \\boxed{3}</think>", None),                          # nothing after thinking
    ("<think>so \\boxed{3} and then", None),                         # thinking never closed
    ("so \\boxed{3} and then", "3"),                  # the prompt opened thinking: read whole
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("the answer is 12.", "12"),
    ("İİİİİİ the answer is 7", "7"),                  # "İ".lower() is 2 characters
    ("The answer is" + " " * 9000 + "7", "7"),                   # linear on a line of spaces
    ("the ANSWER IS 7" + " " * 9000 + "I hope it is correct. ", "7"),
    ("x = 3", "x = 3"),                                               # a bare one-line answer
    ("a long derivation\nwith no answer", None),
    ("The answer is $\\boxed{}$.", None),
    ("Therefore $x+y=\\boxed{", None),
    (None, None),
])
def test_extract_answer(text, answer):
    assert reward.extract_answer(text) == answer


def test_unfinished_completion_scores_zero():
    """ThinkPrune's cutoff: a completion that hit the limit gets 0 whatever it says."""
    assert reward.score("$\\boxed{5}$", "5", finished=False) == 0.0
    assert reward.score("5", "5", finished=False) == 0.0
    assert reward.score("$\\boxed{5}$", "5", finished=True) == 1.0
    assert reward.score("$\\boxed{6}$", "5", finished=True) == 0.0
    assert reward.score_batch(["\\boxed{5}", "\\boxed{5}"], ["5", "5"], [True, False]) == [1.0, 0.0]


HOSTILE = {
    "million-digit number": ("1" * 10**6, "5"),
    "million-digit boxed": ("\\boxed{" + "7" * 10**6 + "}", "5"),
    "5000-digit number": ("9" * 5000, "9" * 4999 + "8"),
    "deep braces": ("\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", "1"),
    "deep parens": ("(" * 11 + "1" + ")" * 11, "1"),
    "power tower": ("\\boxed{10^{10^{10}}}", "5"),
    "power tower + 1": ("\\boxed{10^{10^{10}}+1}", "10^{10^{10}}"),
    "huge factorial": ("\\boxed{(10^{10})!}", "5"),
    "huge integer power": ("\\boxed{2^{100000000}}", "4^{50000000}"),
    "hard simplify": ("\\boxed{\\sin(x)^{200}+\\cos(x)^{200}}", "1"),
    "a megabyte of text": ("x " * 500_000 + "\\boxed{5}", "5"),
    "many boxes": ("\\boxed{1}" * 100_000, "1"),
    "many ±": ("\\boxed{" + "\\pm 1" * 30 + "}", "1"),
    "backslashes": ("\\" * 100_000, "1"),
    "unclosed text": ("\\boxed{" + "\\text{" * 1000 + "}", "5"),
    "long list": ("\\boxed{" + ",".join(["x+1"] * 300) + "}", ",".join(["1+x"] * 300)),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_returns_within_bound(name):
    pred, gold = HOSTILE[name]
    reward.is_equiv("\\sqrt{2}", "\\sqrt{2}+0")  # a warm worker: its one-off start is not the bound
    t = time.monotonic()
    s = reward.score(pred, gold, finished=True)
    assert s in (0.0, 1.0)
    assert time.monotonic() - t < BOUND


def test_slow_comparison_is_cut_off_and_worker_restarts():
    """A comparison over the bound answers False in time; the killed worker is reaped and replaced."""
    assert reward.is_equiv("\\sqrt{8}", "2\\sqrt{2}")
    stuck = reward._idle[-1]  # the worker the next comparison takes
    os.kill(stuck.proc.pid, signal.SIGSTOP)  # it will never answer
    t = time.monotonic()
    assert reward.is_equiv("\\sqrt{8}", "2\\sqrt{2}", timeout=0.3) is False  # true, but not in time
    assert time.monotonic() - t < 0.3 + 1.0
    assert stuck.proc.poll() is not None and stuck not in reward._all  # killed, reaped, dropped
    assert reward.is_equiv("\\sqrt{8}", "2\\sqrt{2}")  # a fresh worker
    zombies = [p for p in os.listdir("/proc") if p.isdigit() and _is_zombie_child(int(p))]
    assert zombies == []


def _is_zombie_child(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] == "Z" and int(stat[1]) == os.getpid()


def test_works_from_threads():
    """SIGALRM would fail here: workers are processes, one per concurrent caller."""
    pairs = [("\\sqrt{117}", "3\\sqrt{13}", True), ("2\\pi+18", "18+2\\pi", True),
             ("\\frac{1}{115}", "116", False), ("6!", "720", True)] * 3
    results = [None] * len(pairs)

    def run(i):
        results[i] = reward.is_equiv(pairs[i][0], pairs[i][1])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert results == [e for _, _, e in pairs]


def test_common_case_is_fast():
    """Integer answers never reach sympy: thousands of calls per second."""
    completion = "<think>" + "step " * 500 + "</think> So the answer is $\\boxed{204}$."
    t = time.perf_counter()
    for _ in range(1000):
        reward.score(completion, "204", True)
        reward.score(completion, "205", True)
    assert 2000 / (time.perf_counter() - t) > 1000
