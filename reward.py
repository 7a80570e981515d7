"""The ThinkPrune reward: 1 for a finished completion whose final answer is right, else 0.

    score(completion, gold, finished) -> float     0 if not finished, else 1 if equivalent, else 0
    extract_answer(text) -> str | None             the final answer a completion gives
    is_equiv(pred, gold) -> bool                   are two answers the same mathematical answer
    score_batch(completions, golds, finished)      score() over a list (what train.py calls)

How an answer is compared (each rule is pinned by a test in tests/test_reward.py):
1. Extraction: the last \\boxed{...} (or \\boxed 5, \\fbox{...}) after the last </think>; a completion
   that gives nothing after it, or that opens <think> itself and never closes it, has no answer.
   With a prompt that opens thinking (R1's template and the toy's end in "<think>\\n") a completion
   has no <think>, so one without </think> is read whole (DeepScaleR's reward instead gives 0 when
   </think> is missing). Fallbacks: "the answer is X" (the last, case ignored), then a short
   one-line text taken as a bare answer.
2. Normalisation (strings only): \\dfrac/\\tfrac, \\left/\\right, spacing commands, $, \\text{} (a
   trailing \\text{...} is a unit and is dropped, a whole-answer \\text{...} is unwrapped), a short list
   of plain unit words, degrees, %, thousands separators (10,\\!080 and 1{,}000 anywhere, a plain
   comma only in a number that is the whole answer or follows "x ="), base subscripts (52_8 matches
   52, not 42: the problem asked for the digits), \\approx and what follows, repeating decimals
   (1.\\overline{3} -> 4/3), \\frac12 -> \\frac{1}{2}, \\sin^{-1} -> \\arcsin, numpy names
   (np.arcsin) -> LaTeX, "(C)" -> "C", \\varnothing -> \\emptyset, \\mathbb{R} -> (-\\infty,\\infty).
3. Structure: a bare list "a, b", a set \\{a, b\\} and a union A \\cup B are compared as multisets
   (order ignored; a union of sets by their elements); a ± in an element stands for both signs;
   "(..)"/"[..]" with a comma is a tuple or interval, compared in order with its brackets (open vs
   closed matters); a matrix is compared entry by entry (an n x 1 or 1 x n matrix equals the tuple
   of its entries); "x \\in S" is S; "a < x <= b" is the interval (a, b]; "x = 5" is 5 when the left
   side is a name (x, f(x), f^{-1}(x), m_{max}, \\dot{x}, dx/dt, (x, y)), the name itself is ignored,
   except when both answers list 2+ values each as "name = value": then a value counts only under
   its own name (a=1, b=2 is not a=2, b=1); other equations match when both sides match, possibly
   swapped, or when lhs - rhs agree up to sign.
4. Leaves: plain numbers (integers, decimals, a/b, \\frac{a}{b}, mixed numbers, 1.5e3, 1.5 \\times
   10^{3}) are compared exactly as fractions, so a rounded decimal of an exact answer is wrong;
   words (3+ letters, and "no") are compared as text, case ignored; anything else is parsed by
   latex2sympy2_extended (a maintained ANTLR LaTeX -> sympy parser; `i` is the imaginary unit,
   \\gamma a variable, decimals exact fractions) and compared numerically at 30 digits with relative
   tolerance 1e-20, at four fixed points for its free symbols, one negative and one in (0, 1) (a
   randomised identity test, so |x| is not x); a difference that simplifies to 0 is the fallback
   when numbers can't be had.

The bound. The parent process never imports sympy: extraction, normalisation, string equality and
exact numbers run here in microseconds, which is the common case in training. Anything needing sympy
goes to a worker subprocess (`python reward.py --worker`, a JSON line per request): it bounds its
own work with SIGALRM (it is single-threaded, so the alarm works there), and the caller, in whatever
thread, waits at most `timeout` seconds, then kills, reaps and restarts it (that answer is False).
This holds in threads and under torchrun, where SIGALRM in the caller would not. One worker per
concurrent caller, at most MAX_WORKERS (callers beyond that queue, and the wait is not counted),
started on first need (its startup, ~1 s, is waited for once and not counted in the timeout);
workers exit when their stdin closes and are killed at interpreter exit. Inputs are capped before
any regex (texts at 1 MB, answers at 1,000 characters for structure and 400 for sympy, bracket
depth 12, numbers 4,000 digits, exponents 400); past a cap only string equality decides.

Simplifications: bare comma lists are unordered (so an ordered triple written without brackets
matches its permutations); proportional equations (2y = 4x vs y = 2x) do not match; units,
percent and degree signs are dropped (62.5% matches 62.5, not 0.625; no degrees <-> radians;
cm^2 matches cm^3); a numeric match at 30 digits is taken as proof; beyond 10^5000 two spellings
of an exact value are equal only if sympy simplifies their difference to 0 within the bound.
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

TIMEOUT = 1.5            # seconds a call may spend on sympy, whatever the input
STARTUP_TIMEOUT = 60.0   # a worker's imports (sympy, antlr) on a loaded machine
MAX_TEXT = 1_000_000     # characters of a completion we look at (its end)
MAX_ANSWER = 1_000       # longer answers are compared as strings only
MAX_SYMPY = 400          # longer leaves are not handed to the parser
MAX_DEPTH = 12           # deeper bracket nesting: strings only (the parser's time grows fast)
MAX_DIGITS = 4_000       # below Python's int/str conversion limit (4,300)
MAX_EXP = 400            # 10^k with |k| above this is not expanded to an exact fraction


# ---------------------------------------------------------------- 1. extraction

def _braced(s, i):
    """Content of the {...} group opening at s[i], or None if it does not close within MAX_ANSWER*4."""
    depth = 0
    for j in range(i, min(len(s), i + MAX_ANSWER * 4)):
        if s[j] == "{" and s[j - 1] != "\\":
            depth += 1
        elif s[j] == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[i + 1:j]
    return None


def extract_answer(text):
    """The final answer of a completion (see the module docstring), or None."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT:]
    if "</think>" in text:
        text = text[text.rfind("</think>") + len("</think>"):]
    elif "<think>" in text:
        return None  # thinking never closed: no answer was given
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i >= 0:
        j = i + (6 if text.startswith("\\boxed", i) else 5)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            ans = _braced(text, j)
        else:  # \boxed 5
            m = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER])
            ans = m.group(0) if m else None
        return ans.strip() or None if ans is not None else None
    # the last "answer is", case ignored, found in the text itself: lower() can change its length
    tail = text[-10_000:]
    ends = [m.end() for m in re.finditer(r"(?i)answer is", tail)]
    if ends:
        # rstrip, then a pattern with no leading \s*: linear even on a line of spaces
        ans = tail[ends[-1]:].split("\n")[0].rstrip()
        ans = re.sub(r"(?i)i hope it is correct\.?$", "", ans).strip(" :$.")
        return ans or None
    text = text.strip()
    if text and len(text) <= 200 and "\n" not in text:  # a bare answer
        return text
    return None


# ---------------------------------------------------------------- 2. normalisation

_UNICODE = {"∞": "\\infty", "°": "^\\circ", "−": "-", "×": "\\times", "·": "\\cdot", "π": "\\pi",
            "√": "\\sqrt", "≤": "\\le ", "≥": "\\ge ", "∪": "\\cup ", "±": "\\pm "}
_UNITS = (r"(?:square |cubic |sq\.? )?(?:units?|degrees?|cm|mm|km|meters?|metres?|inch(?:es)?|"
          r"feet|foot|ft|miles?|mph|cents?|dollars?|hours?|minutes?|mins?|seconds?|days?|weeks?|"
          r"years?|people|students|ways|points)")
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname|boldsymbol)\s*"


_FRAC_SQRT = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])")


def _fix_args(s, depth=0):
    """\\frac12 -> \\frac{1}{2}, \\frac{270}7 -> \\frac{270}{7}, \\sqrt3 -> \\sqrt{3}, also nested."""
    if depth > MAX_DEPTH:
        return s
    out, i = [], 0
    while True:
        m = _FRAC_SQRT.search(s, i)
        if not m:
            return "".join(out) + s[i:]
        out.append(s[i:m.end()])
        i = m.end()
        for _ in range(2 if m.group(1) == "frac" else 1):
            while i < len(s) and s[i] == " ":
                i += 1
            if m.group(1) == "sqrt" and s.startswith("[", i):  # \sqrt[3]{x}: keep the index
                k = s.find("]", i)
                if k < 0:
                    break
                out.append(s[i:k + 1])
                i = k + 1
            if i >= len(s):
                break
            if s[i] == "{":
                body = _braced(s, i)
                if body is None:
                    break
                out.append("{" + _fix_args(body, depth + 1) + "}")
                i += len(body) + 2
            else:
                tok = re.match(r"\\[a-zA-Z]+|.", s[i:i + 50]).group(0)
                out.append("{" + tok + "}")
                i += len(tok)


def _repeating(m):
    """4.\\overline{6} -> \\frac{42}{9}: a.b(c) = (abc - ab) / (9..90..)."""
    a, b, c = m.group(1) or "0", m.group(2), m.group(3)
    num = int(a + b + c) - int(a + b)
    return "\\frac{%d}{%s}" % (num, "9" * len(c) + "0" * len(b))


def normalize(s):
    """A canonical LaTeX spelling of one answer (string rules only; never raises)."""
    s = str(s)[:MAX_ANSWER * 4].strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_answer(s) or ""
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r",\s*\\!\s*(?=\d{3})|(?<=\d)\{,\}(?=\d{3})", "", s)  # 10,\!080 and 1{,}000: thousands
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle|quad|qquad)(?![a-zA-Z])|(?<!\\)\\[!,;: ]|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "", s)
    s = re.sub(r"\\text\{\s*(or|and)\s*\}|(?<=\s)or(?=\s)", ",", s)  # "1 \text{ or } 2" lists
    # \text{...}: a trailing one after something else is a unit; otherwise unwrap it.
    rest = re.sub(r"(?:\s*" + _TEXT_CMD + r"\{[^{}]*\}(?:\^\{?\d\}?)?)+\s*$", "", s)
    if rest.strip() and rest != s:
        s = rest
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=[\d}\s])\s*" + _UNITS + r"(?:\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"\b(?:np|math|sympy)\.", "", s)
    s = re.sub(r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|"
               r"log|exp|sqrt|pi|infty)(?![a-zA-Z])", r"\\\1", s)
    s = re.sub(r"\\(sin|cos|tan)\s*\^\s*\{?\s*-1\s*\}?", r"\\arc\1", s)
    s = re.sub(r"\\(le|ge)q(?:slant)?(?![a-zA-Z])", r"\\\1", s)
    s = re.sub(r"\\varnothing|\\\{\s*\\\}", r"\\emptyset", s)
    s = s.replace("\\mathbb{R}", "(-\\infty,\\infty)")
    s = re.sub(r"(?<=\S)\s*\\approx.*", "", s)  # "\frac23 \approx 0.67": the exact value is the answer
    s = re.sub(r"^\s*\\approx", "", s)  # "\approx 8.24": there is no exact value
    s = re.sub(r"\\(?:lt)(?![a-zA-Z])", "<", s)
    s = re.sub(r"\\(?:gt)(?![a-zA-Z])", ">", s)
    s = _fix_args(s)
    s = re.sub(r"(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating, s)
    s = re.sub(r"(^|[(\[{,])\s*\+", r"\1", s)  # +\infty, (2, +3)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    m = re.fullmatch(r"((?:%s)\s*=\s*)?(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?)" % _NAME, s)
    if m:  # 32,348 or x = 32,348 as a whole answer
        s = (m.group(1) or "") + m.group(2).replace(",", "")
    s = re.sub(r"^\(([A-E])\)$", r"\1", s)  # a multiple-choice letter
    return s


def _key(s):
    return re.sub(r"\s+", "", s)


# ---------------------------------------------------------------- 3. structure

_OPEN, _CLOSE = "([{", ")]}"
_NAME = (r"(?:[A-Za-z]|\\[a-zA-Z]+)(?:_\{[^{}]*\}|_[A-Za-z0-9])?(?:\^\{?-1\}?)?(?:\([^()]*\))?'*"
         r"|\\d?dot\{[A-Za-z]\}|\\frac\{d\s*[A-Za-z]?\}\{d\s*[A-Za-z]\}")


_NAMES = r"\(\s*(?:%s)(?:\s*,\s*(?:%s))*\s*\)" % (_NAME, _NAME)  # (x, y) = (1, 2)


def _depth(s):
    d = best = 0
    for ch in s:
        if ch in _OPEN:
            d += 1
            best = max(best, d)
        elif ch in _CLOSE:
            d -= 1
    return best


def _split(s, seps):
    """Split s at top-level (bracket depth 0) occurrences of any separator in seps."""
    parts, d, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in _OPEN:
            d += 1
        elif ch in _CLOSE:
            d -= 1
        elif d == 0:
            for sep in seps:
                if s.startswith(sep, i):
                    parts.append(s[start:i])
                    start = i + len(sep)
                    i = start - 1
                    break
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _closes_at_end(s):
    """Does the bracket opening at s[0] close at the very end of s?"""
    d = 0
    for i, ch in enumerate(s):
        d += ch in _OPEN
        d -= ch in _CLOSE
        if d == 0:
            return i == len(s) - 1
    return False


def _group(s):
    """A tuple / interval / matrix as (open, items, close), or None for anything else."""
    m = re.fullmatch(r"\\begin\{([pbB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", s, re.S)
    if m:
        rows = [[c.strip() for c in r.split("&")] for r in m.group(2).split("\\\\") if r.strip()]
        if len(rows) == 1 or all(len(r) == 1 for r in rows):  # a vector is a tuple
            return "(", [c for r in rows for c in r], ")"
        return "M", [("[", r, "]") for r in rows], "M"
    if re.match(r"[A-Za-z][(\[]", s) and s[1] + s[-1] in ("(]", "[)"):
        s = s[1:]  # "t(0,4]": a half-open interval cannot be a function call, the t is a stray name
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        items = _split(s[1:-1], [","])
        if len(items) >= 2:
            return s[0], items, s[-1]
    return None


def _inequality(s):
    """a < x <= b -> (a,b]; x >= a -> [a,\\infty); a > x -> (-\\infty,a); anything else unchanged."""
    parts = re.split(r"\s*(<|>|\\le|\\ge)(?![a-zA-Z])\s*", s)
    up = [op in ("<", "\\le") for op in parts[1::2]]
    closed = [op in ("\\le", "\\ge") for op in parts[1::2]]
    name = [re.fullmatch(_NAME, p) is not None for p in parts[::2]]
    if len(parts) == 5 and name[1] and up[0] == up[1]:
        lo, hi = (parts[0], parts[4]) if up[0] else (parts[4], parts[0])
        c_lo, c_hi = closed if up[0] else closed[::-1]
        return "([" [c_lo] + lo + "," + hi + ")]" [c_hi]
    if len(parts) == 3 and name[0] != name[1]:
        bound = parts[2] if name[0] else parts[0]
        if up[0] == name[0]:  # x < b, b > x
            return "(-\\infty," + bound + ")]" [closed[0]]
        return "([" [closed[0]] + bound + ",\\infty)"
    return s


def _elements(s):
    """The answers a string lists: split at top-level \\cup, a set's braces dropped (so a union of
    sets lists their elements), split at top-level , ; each element stripped of "x \\in" and
    "name =", inequalities made intervals, ± expanded into both signs."""
    # a part is a set only if its \{ closes at its very end: \{1\} \cup \{2\} is two sets, not one
    parts = [p[2:-2] if p.startswith("\\{") and p.endswith("\\}") and _closes_at_end(p[1:]) else p
             for p in _split(s, ["\\cup"])]
    out = []
    for e in (e for p in parts for e in _split(p, [",", ";"])):
        e = re.sub(r"^(?:" + _NAME + r")\s*\\in\s*", "", e)
        e = _inequality(e)
        sides = _split(e, ["="])
        if len(sides) == 2 and (re.fullmatch(_NAME, sides[0]) or re.fullmatch(_NAMES, sides[0])):
            e = sides[1]
        signs = re.findall(r"\\pm|\\mp", e)
        if 0 < len(signs) <= 4:
            variants = [e]
            for _ in signs:
                variants = [v.replace(p, q, 1) for v in variants
                            for p in re.findall(r"\\pm|\\mp", v)[:1] for q in "+-"]
            out.extend(variants)
        else:
            out.append(e)
    return out


def _named(s):
    """[(name, value), ...] if s lists 2+ elements, each "name = value" with a simple name; else None."""
    pairs = [_split(e, ["="]) for e in _split(s, [",", ";"])]
    if len(pairs) >= 2 and all(len(q) == 2 and re.fullmatch(_NAME, q[0]) for q in pairs):
        return [(_key(q[0]), q[1]) for q in pairs]
    return None


def _multiset_equal(xs, ys, same):
    if len(xs) != len(ys):
        return False
    ys = list(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if same(x, y):
                del ys[j]
                break
        else:
            return False
    return True


def _equiv(p, g, leaf):
    if not p or not g:
        return False
    if _key(p) == _key(g):
        return True
    np_, ng = _named(p), _named(g)
    if np_ and ng:  # both sides name their values (a=1, b=2 vs a=2, b=1): names must pair too
        return _multiset_equal(np_, ng, lambda x, y: x[0] == y[0] and _equiv_one(x[1], y[1], leaf))
    ps, gs = _elements(p), _elements(g)
    if len(ps) == 1 and len(gs) == 1:
        return _equiv_one(ps[0], gs[0], leaf)
    return _multiset_equal(ps, gs, lambda x, y: _equiv_one(x, y, leaf))


def _equiv_one(a, b, leaf):
    if isinstance(a, tuple) or isinstance(b, tuple):  # rows of a matrix
        return isinstance(a, tuple) and isinstance(b, tuple) and _groups_equal(a, b, leaf)
    if not a or not b:
        return False
    if _key(a) == _key(b):
        return True
    ga, gb = _group(a), _group(b)
    if ga and gb:
        return _groups_equal(ga, gb, leaf)
    if ga or gb:  # a group against a non-group: only a scaled matrix can still match
        return "\\begin" in a + b and leaf(a, b)
    ea, eb = _split(a, ["="]), _split(b, ["="])
    if len(ea) == 2 and len(eb) == 2:
        return (_equiv_one(ea[0], eb[0], leaf) and _equiv_one(ea[1], eb[1], leaf)) or \
            (_equiv_one(ea[0], eb[1], leaf) and _equiv_one(ea[1], eb[0], leaf)) or \
            leaf("%s-(%s)" % tuple(ea), "%s-(%s)" % tuple(eb)) or \
            leaf("%s-(%s)" % tuple(ea), "%s-(%s)" % (eb[1], eb[0]))
    if len(ea) != 1 or len(eb) != 1:
        return False
    return leaf(a, b)


def _groups_equal(ga, gb, leaf):
    (oa, xs, ca), (ob, ys, cb) = ga, gb
    return oa == ob and ca == cb and len(xs) == len(ys) and \
        all(_equiv_one(x, y, leaf) for x, y in zip(xs, ys))


# ---------------------------------------------------------------- 4. leaves

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"  # unambiguous: no quadratic backtracking


def _number(s):
    """An exact Fraction for a plain number (see the docstring), else None."""
    s = s.replace(" ", "")
    if len(s) > MAX_DIGITS:
        return None
    try:
        m = re.fullmatch(r"(%s)(?:[eE]([+-]?\d+)|(?:\\times|\\cdot)10\^\{?([+-]?\d+)\}?)?" % _NUM, s)
        if m:
            k = int(m.group(2) or m.group(3) or 0)
            return Fraction(m.group(1)) * Fraction(10) ** k if abs(k) <= MAX_EXP else None
        m = re.fullmatch(r"10\^\{?([+-]?\d+)\}?", s)
        if m:
            return Fraction(10) ** int(m.group(1)) if abs(int(m.group(1))) <= MAX_EXP else None
        m = re.fullmatch(r"(%s)/(%s)" % (_NUM, _NUM), s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = re.fullmatch(r"([+-]?)(\d*)\\frac\{(%s)\}\{(%s)\}" % (_NUM, _NUM), s)
        if m:  # -\frac{a}{b}, and 1\frac{4}{5} as a mixed number
            v = int(m.group(2) or 0) + Fraction(m.group(3)) / Fraction(m.group(4))
            return -v if m.group(1) == "-" else v
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _is_word(s):
    return re.fullmatch(r"[A-Za-z][A-Za-z ]{2,}|[Nn][Oo]", s) is not None  # not "mn": a product


class _NeedSympy(Exception):
    pass


_BASE = re.compile(r"(-?[0-9A-Z]+)_\{?(\d+)\}?")


def _leaf_fast(a, b):
    """Decide a leaf without sympy, or raise _NeedSympy."""
    a, b = a.lstrip("+"), b.lstrip("+")
    if _key(a) == _key(b):
        return True
    ba, bb = _BASE.fullmatch(a), _BASE.fullmatch(b)
    if ba or bb:  # 52_8: a numeral in base 8; against a bare numeral, the digits are what was asked
        if ba and bb:
            return ba.groups() == bb.groups()
        return (ba or bb).group(1) == (b if ba else a)
    if _is_word(a) or _is_word(b):
        return _key(a).lower() == _key(b).lower()
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    raise _NeedSympy


def _leaf_sympy(a, b):
    """_leaf_fast, else parse both with latex2sympy2_extended and compare numerically."""
    try:
        return _leaf_fast(a, b)
    except _NeedSympy:
        pass
    if max(len(a), len(b)) > MAX_SYMPY:
        return False
    x, y = _parse(a.lstrip("+")), _parse(b.lstrip("+"))
    if x is None or y is None:
        return False
    import sympy
    if x == y:
        return True
    mx, my = [getattr(v, "is_Matrix", False) for v in (x, y)]
    if mx or my:
        if not (mx and my):
            return False
        x, y = sympy.Matrix(x.doit()), sympy.Matrix(y.doit())
        return x.shape == y.shape and all(_expr_equal(u, v) for u, v in zip(x, y))
    if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
        return False  # sets, relations, ... that the rules above did not take apart
    return _expr_equal(x, y)


def _parse(s):
    import sympy
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy
    # \gamma in an answer is a variable (a Lorentz factor, an angle), not Euler's constant
    s = re.sub(r"\\gamma(?![a-zA-Z])", r"\\mathit{gamma}", s)
    # decimals as exact fractions, so that a rounded decimal never passes for an exact value
    s = re.sub(r"(\d*)\.(\d+)",
               lambda m: "\\frac{%s}{1%s}" % (m.group(1) + m.group(2), "0" * len(m.group(2))), s)
    try:
        e = latex2sympy(s, normalization_config=None,
                        conversion_config=ConversionConfig(lowercase_symbols=False))
    except Exception:
        return None
    if isinstance(e, sympy.Basic) and sympy.Symbol("i") in e.free_symbols:
        e = e.xreplace({sympy.Symbol("i"): sympy.I})  # in an answer, i is the imaginary unit
    return e


def _expr_equal(x, y):
    """Equal at 30 digits (rel. 1e-20) at 4 fixed points of the free symbols; else simplify(x-y)."""
    import sympy
    syms = sorted(x.free_symbols | y.free_symbols, key=str)
    # a negative point and one in (0, 1), so x and |x|, \sqrt{x^2}, \max(x, 0) part; larger ones of
    # different sizes, so floor(m/2) and floor(m/3) part; distinct per symbol
    scales = [sympy.Rational(n, d) for n, d in ((-13, 11), (3, 7), (101, 9), (257, 13))]
    points = [{s: scales[k] + sympy.Rational(j, 7) for j, s in enumerate(syms)}
              for k in range(len(scales) if syms else 1)]
    seen = 0
    for pt in points:
        try:
            u, v = x.evalf(30, subs=pt), y.evalf(30, subs=pt)
        except Exception:
            continue
        if not (u.is_number and v.is_number):
            continue
        if any(w.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) for w in (u, v)):
            if syms:
                continue  # a pole of one point says nothing
            return u == v
        d, m = abs(sympy.N(u - v, 30)), max(abs(u), abs(v))
        if not (d.is_number and m.is_number):
            continue
        if d > 1e-20 * m:
            return False
        if m > 1e15:
            # a relative tolerance cannot tell 2^{1009} from 2^{1009}+1: redo at all its digits + 30
            digits = int(sympy.log(m, 10).evalf(5)) + 30
            if digits > 5000:
                return sympy.simplify(x - y) == 0
            u, v = x.evalf(digits, subs=pt), y.evalf(digits, subs=pt)
            if abs(sympy.N(u - v, digits)) > 1e-20:
                return False
        seen += 1
    if seen:
        return True
    try:
        return sympy.simplify(x - y) == 0
    except Exception:
        return False


# ---------------------------------------------------------------- 5. the bound: worker processes

class _Worker:
    """One `python reward.py --worker` child; a request is a JSON line, the answer "1" or "0"."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True)
        self.ready = False

    def _readline(self, deadline):
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return None  # the worker died
            buf += chunk
        return buf.decode().strip()

    def ask(self, p, g, timeout):
        """True/False, or None if the worker failed to answer in time (it is then dead)."""
        try:
            if not self.ready:
                self.ready = self._readline(time.monotonic() + STARTUP_TIMEOUT) == "ready"
                if not self.ready:
                    return None
            self.proc.stdin.write((json.dumps([p, g, timeout]) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(time.monotonic() + timeout)
        except OSError:
            line = None
        return None if line not in ("0", "1") else line == "1"

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)  # reap: no zombies
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))  # more callers than this queue for a worker
_idle, _all, _lock = [], [], threading.Lock()
_slots = threading.BoundedSemaphore(MAX_WORKERS)
_broken = []  # set when a worker could not even start (e.g. latex2sympy2_extended missing)


def _ask_worker(p, g, timeout):
    if _broken:
        return False
    with _slots:
        return _ask_worker_slot(p, g, timeout)


def _ask_worker_slot(p, g, timeout):
    with _lock:
        w = _idle.pop() if _idle else None
        if w is None:
            w = _Worker()
            _all.append(w)
    ok = w.ask(p, g, timeout)
    with _lock:
        if not w.ready:
            _broken.append(w)
            print("reward.py: the sympy worker did not start; hard comparisons count as wrong",
                  file=sys.stderr)
        if ok is None:  # too slow or dead: kill it and start a fresh one now, so it is warm next time
            w.kill()
            _all.remove(w)
            w = _Worker()
            _all.append(w)
        _idle.append(w)
    return bool(ok)


@atexit.register
def _shutdown():
    with _lock:
        for w in _all:
            w.kill()
        _all.clear()
        _idle.clear()


def _serve():
    """The worker loop: each request runs under its own SIGALRM budget (we are the main thread)."""
    import signal
    sys.setrecursionlimit(10_000)
    import sympy  # noqa: F401  (pay the imports before saying ready)
    import latex2sympy2_extended.latex2sympy2  # noqa: F401

    def alarm(*_):
        raise TimeoutError
    signal.signal(signal.SIGALRM, alarm)
    print("ready", flush=True)
    for line in sys.stdin:
        ok = False
        try:
            p, g, timeout = json.loads(line)
            # repeating, in case a library swallows the first TimeoutError in an `except Exception`
            signal.setitimer(signal.ITIMER_REAL, 0.8 * timeout, 0.05)
            ok = _equiv(p, g, _leaf_sympy)
        except BaseException:
            ok = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print("1" if ok else "0", flush=True)


# ---------------------------------------------------------------- 6. the public functions

def is_equiv(pred, gold, timeout=TIMEOUT):
    """Same mathematical answer? Never raises; returns within `timeout` s (+ a worker start)."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if _key(pred[:MAX_ANSWER * 4]) == _key(gold[:MAX_ANSWER * 4]) and len(pred) <= MAX_ANSWER * 4:
            return bool(_key(pred))
        if max(len(pred), len(gold)) > MAX_ANSWER:
            return pred.strip() == gold.strip()
        p, g = normalize(pred), normalize(gold)
        if max(_depth(p), _depth(g)) > MAX_DEPTH:
            return _key(p) == _key(g) != ""
        try:
            return _equiv(p, g, _leaf_fast)
        except _NeedSympy:
            return _ask_worker(p, g, timeout)
    except Exception:
        return False


def score(completion, gold, finished):
    """ThinkPrune's reward: 0.0 if the completion was cut off, else 1.0 iff its answer is right."""
    if not finished:
        return 0.0
    return float(is_equiv(extract_answer(completion), gold))


def score_batch(completions, golds, finished):
    """score() for each (completion, gold, finished) triple, as a list of floats."""
    return [score(c, g, f) for c, g, f in zip(completions, golds, finished)]


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
