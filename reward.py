"""The ThinkPrune reward: 1 for a finished completion whose final answer is right, else 0.

    score(completion, gold, finished) -> float     0 if not finished, else 1 if equivalent, else 0
    extract_answer(text) -> str | None             the final answer a completion gives
    is_equiv(pred, gold, timeout=TIMEOUT) -> bool  are two answers the same mathematical answer

Extraction, after the last </think> (a completion that opens <think> and never closes it, or gives
nothing after it, has no answer; R1's prompt opens thinking, so one without tags is read whole):
the last \\boxed{} (or \\fbox), joined by the boxes before it that only commas, "and", "or" or
spacing separate from it: one list, compared whole, so boxing every option is wrong. A later
"answer is" / "Answer:" / "####" statement in math, or with no box any, gives its formula or sentence.
Otherwise a short text that is not prose is the answer, and prose gives its last formula or number.

Policies, with the reason (each pinned by a test in tests/test_reward.py; its POLICY lists the
other graders' verdicts they overrule):
- Exact values: a decimal equals a fraction only if it is exactly that fraction (0.5 = \\frac12,
  4.67 != \\frac{14}{3}): a rounded answer to an exact question is a different answer.
- Undefined values (x/0, a time read as a fraction) never equal anything, not even themselves:
  a policy must not score by dividing by zero.
- Units, a trailing \\text{}, "percent" and the %, $ and degree signs are dropped, as graders of
  these benchmarks do (62.5% is 62.5); X% is also X/100 (62.5% is 0.625), since that is its value;
  degrees inside a trig function are degrees; h:mm(:ss) is a time.
- Lists, sets and unions are sets (order and repeats ignored: "1, 2" is "2, 1, 1"), and "and",
  "or", ";" separate items: the problems ask for all solutions, not an order. (..)/[..] with a
  comma is an ordered tuple or an interval (ends matter), and a set is not a tuple; a matrix is
  compared entry by entry (a column or row vector is a tuple).
- "name = v" is v, for names such as x, f(x), |AB|, V_1:V_2, \\frac{NO}{BO}, (p, q): the problem
  names the unknown. A chain a = b = c states c; "x \\approx 11" with nothing exact states 11.
  A function application (\\sin x) is an expression, never a name. Other equations match when
  lhs - rhs of one is a nonzero constant times that of the other. When both answers list 2+
  "name = value" items, values pair by name.
- "a < x <= b" is the interval (a, b]. A decimal comma (1,22) is read only in a completion, against
  a gold with a decimal point: golds write lists tightly (2,4 is two roots).
- Expressions are parsed by latex2sympy2_extended (i is the imaginary unit, \\gamma a variable) and
  compared at 30 digits at four fixed points of their free symbols (one negative, one in (0, 1));
  beyond 10^5000 only a difference that simplifies to 0 counts.

The bound: the parent process never imports sympy. Strings and exact numbers are decided here;
anything needing sympy runs in a bounded.Pool worker process, and a comparison that takes more than
`timeout` seconds is False. Inputs are capped before any regex (the MAX_* constants below); past a
cap only string equality decides.
"""
import re
from fractions import Fraction

import bounded

TIMEOUT = 1.5            # seconds a call may spend on sympy, whatever the input
MAX_TEXT = 1_000_000     # characters of a completion we look at (its end)
MAX_ANSWER = 1_000       # longer answers are compared as strings only
MAX_SYMPY = 400          # longer leaves are not handed to the parser
MAX_DEPTH = 12           # deeper bracket nesting: strings only (the parser's time grows fast)
MAX_DIGITS = 4_000       # below Python's int/str conversion limit (4,300)
MAX_EXP = 400            # 10^k with |k| above this is not expanded to an exact fraction
MAX_BOXES = 20           # a longer run of boxes is not an answer

_SYMPY = bounded.Pool(__file__, preload=("sympy", "latex2sympy2_extended.latex2sympy2"))


def score(completion, gold, finished):
    """ThinkPrune's reward: 0.0 if the completion was cut off, else 1.0 iff its answer is right."""
    if not finished:
        return 0.0
    return float(is_equiv(extract_answer(completion), gold))


def is_equiv(pred, gold, timeout=TIMEOUT):
    """Same mathematical answer? Never raises; returns within `timeout` s (+ a worker start)."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if _key(pred[:MAX_ANSWER * 4]) == _key(gold[:MAX_ANSWER * 4]) and len(pred) <= MAX_ANSWER * 4:
            return bool(_key(pred))
        if max(len(pred), len(gold)) > MAX_ANSWER * 4:
            return pred.strip() == gold.strip()
        if _is_percent_of(pred, gold) or _is_percent_of(gold, pred):
            return True  # 62.5% is 0.625 (and, as a unit dropped, 62.5 below)
        p, g = normalize(pred), normalize(gold)
        if max(len(p), len(g)) > MAX_ANSWER or max(_depth(p), _depth(g)) > MAX_DEPTH:
            return _key(p) == _key(g) != ""
        try:
            return _equiv(p, g, _leaf_fast)
        except _NeedSympy:
            return _SYMPY.call("_equiv_sympy", [p, g], timeout) is True
    except Exception:
        return False


# ---------------------------------------------------------------- 1. extraction

def extract_answer(text):
    """The final answer of a completion (see the module docstring), or None."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT:]
    if "</think>" in text:
        text = text[text.rfind("</think>") + len("</think>"):]
    elif "<think>" in text:
        return None  # thinking never closed: no answer was given
    return _final(_undouble(text))


def _undouble(s):
    """\\\\frac -> \\frac: a string escaped once more (a JSON or code literal) has every command doubled."""
    return re.sub(r"(?<!\\)\\\\(?=[a-zA-Z]{2,})", r"\\", s) if "\\\\" in s else s


_MARK = re.compile(r"(?i)\banswer\b(?:\s*is\b)?\s*:?|####")  # #### 42: GSM8K's marker
_SEGMENT = re.compile(r"\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([^\n]+?)\\\)"
                      r"|(?<!\\)\$((?:[^$\n\\]|\\.)+?)\$")
_PLAIN_NUMBER = r"(?<![\w.\\{^_])-?\d+(?:[.,]\d+)*(?:\s*/\s*\d+)?%?"
_MATH = re.compile(_SEGMENT.pattern + "|(" + _PLAIN_NUMBER + ")")


def _final(text):
    """The answer a text gives: its last group of boxes, a later "answer is", else the text itself."""
    box_end, ans = _boxes(text)
    tail = text[max(box_end, 0, len(text) - 10_000):]
    for m in list(_MARK.finditer(tail))[-3:][::-1]:  # the last statement that gives something
        stated = _statement(tail[m.end():m.end() + MAX_ANSWER])
        if stated and (box_end < 0 or _words(stated) == 0):
            return stated  # after a box, only a statement in math, not in words ("it is correct")
    if box_end >= 0:
        return ans
    text = text.strip()
    if _words(text[-10_000:]) >= 2:  # prose
        found = _last_math(text[-10_000:])
        if found or "\n" in text or len(text) > 100:
            return found
    return text if 0 < len(text) <= MAX_ANSWER * 4 else None  # a bare answer


def _last_math(text):
    """The last math segment or plain number of a text, or None."""
    last = None
    for last in _MATH.finditer(text):
        pass
    return next((g.strip() for g in last.groups() if g), None) if last else None


def _statement(rest):
    """What follows "answer is": a display formula that starts it, else the rest of its sentence."""
    rest = re.sub(r'^[\s:*]*(?:\\?")?', "", rest)  # "answer is: \"$12$\""
    m = re.match(r"\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]", rest)
    if m:
        return (m.group(1) or m.group(2)).strip() or None
    sentence = re.split(r"\n|\.(?=\s|$)", rest, maxsplit=1)[0]
    sentence = re.sub(r'(?i)i hope it is correct.*|\\?"\s*$', "", sentence).strip(" .:*")
    m = _SEGMENT.match(sentence)
    if m and not _MATH.search(sentence[m.end():]):  # "$\\frac12$ cup", but not "$12$ and $13$"
        return next(g for g in m.groups() if g).strip() or None
    return _last_math(sentence) if _words(sentence) >= 2 else sentence or None


def _words(s):
    """How many words of 3+ letters s has that are not LaTeX commands (with a word argument:
    \\begin{array}), \\text{} contents, units, "and" or "or". Two make prose, not an answer."""
    s = re.sub(_TEXT_CMD + r"\{[^{}]*\}|\\[a-zA-Z]+(?:\{[a-zA-Z* ]*\})?|(?<![a-zA-Z])(?:and|or|"
               + _UNITS + r")(?![a-zA-Z])", " ", s)
    return len(re.findall(r"[A-Za-z]{3,}", s))


def _boxes(text):
    """(end of the last box, its group's answer): boxes that only commas, "and", "or" and spacing
    separate form one list; (-1, None) if there is no box, (end, None) if the last is unusable."""
    starts = [m.start() for m in re.finditer(r"\\boxed|\\fbox", text)]
    if not starts:
        return -1, None
    items, nxt, last_end = [], None, None
    for i in reversed(starts[-(MAX_BOXES + 2):]):  # enough to see a run longer than the cap
        body, end = _box_at(text, i)
        if last_end is None:
            last_end = end
            if body is None:
                return end, None
        if body is None or (nxt is not None and end <= nxt and not _connects(text[end:nxt])):
            break
        if nxt is not None and end > nxt:  # a box around the box we have: it is the answer
            items[-1] = body
        else:
            items.append(body)
        nxt = i
    if len(items) > MAX_BOXES:
        return last_end, None
    items = list(dict.fromkeys(b.strip() for b in reversed(items)))  # a repeated box counts once
    return last_end, ", ".join(items) if all(items) else None


def _box_at(text, i):
    """(content, end) of the box command at text[i], or (None, i + 1) if it does not close."""
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        body = _braced(text, j)
        return (body, j + len(body) + 2) if body is not None else (None, i + 1)
    m = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER])  # \boxed 5
    return (m.group(0), j + m.end()) if m else (None, i + 1)


def _connects(sep):
    """Do two boxes this far apart belong to one answer? Only spacing, punctuation, and a few words
    with "and"/"or" between them ("\\boxed{1} and \\boxed{2}", "\\boxed{3} or x = \\boxed{4}")."""
    if len(sep) > 60:
        return False
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r" \1 ", sep)
    s = re.sub(r"\$|\\[()\[\]]|\\q?quad|\\[,;:! ]|[~,;.+&=\s]", " ", s)
    words = s.split()
    return not words or (len(words) <= 4 and bool({"and", "or"} & set(words))
                         and not re.search(r"\d", re.sub(r"_\{?\w+\}?", "", s)))  # y_2 is a name


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


# ---------------------------------------------------------------- 2. normalisation

_UNICODE = {"∞": "\\infty", "°": "^\\circ", "−": "-", "×": "\\times", "·": "\\cdot", "π": "\\pi",
            "√": "\\sqrt", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "∪": "\\cup ", "±": "\\pm ",
            "€": "", "²": "^2", "³": "^3"}
_UNITS = (r"(?:square |cubic |sq\.? )?(?:units?|degrees?|cm|mm|km|meters?|metres?|inch(?:es)?|"
          r"feet|foot|ft|miles?|mph|cents?|dollars?|yuan|hours?|minutes?|mins?|seconds?|days?|"
          r"weeks?|years?|people|students|ways|points|percent(?:age)?|pct)")
_TEXT_CMD = (r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname|"
             r"boldsymbol)\s*")
_FUNCS = (r"arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|log|exp|sqrt|frac|pi|"
          r"infty|emptyset|cup|cap|in|pm|mp|le|ge|ne|cdot|times|div|binom|lfloor|lceil|max|min|gcd|lcm|"
          r"lim|sum|int|prod|det")
_FRAC_SQRT = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])")


def normalize(s):
    """A canonical LaTeX spelling of one answer (string rules only; never raises)."""
    s = _undouble(str(s)[:MAX_ANSWER * 4].strip())
    if re.search(r"\\boxed|\\fbox|\$|\\\(|\\\[", s) or _words(s) >= 2:  # a completion, not an answer
        s = _final(s) or ""
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = re.sub(r"\\[()\[\]]", " ", s)  # \( \) \[ \] around an answer
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r",\s*\\!\s*(?=\d{3})|(?<=\d)\s*\{\s*,\s*\}\s*(?=\d{3})", "", s)  # 10,\!080, 1{,}000
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![a-zA-Z])|\\q?quad|(?<!\\)\\[!,;: ]|~", " ", s)
    # degrees inside a trig function are an angle; elsewhere the sign is dropped
    s = re.sub(r"(\\?(?:sin|cos|tan|cot|sec|csc)\s*\(?\s*)(\d+(?:\.\d+)?)\s*\^\s*\{?\s*\\circ\s*\}?",
               r"\1\\frac{\2\\pi}{180}", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "", s)
    s = re.sub(r"\\text\s*\{\s*(or|and)\s*\}|(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])", ",", s)
    # \text{...}: a trailing one after something else is a unit; otherwise unwrap it.
    rest = re.sub(r"(?:\s*" + _TEXT_CMD + r"\{[^{}]*\}(?:\^\{?\d\}?)?)+\s*$", "", s)
    if rest.strip() and rest != s:
        s = rest
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=[\d}\s])\s*" + _UNITS + r"(?:\^\{?\d\}?)?\s*\.?$", "", s)
    s = re.sub(r"\b(?:np|math|sympy)\.", "", s)
    s = re.sub(r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|"
               r"log|exp|sqrt|pi|infty)(?![a-zA-Z])", r"\\\1", s)
    s = re.sub(r"\\(sin|cos|tan)\s*\^\s*\{?\s*-1\s*\}?", r"\\arc\1", s)
    s = re.sub(r"<=|\\leq?(?:slant)?(?![a-zA-Z])", r"\\le ", s)
    s = re.sub(r">=|\\geq?(?:slant)?(?![a-zA-Z])", r"\\ge ", s)
    s = re.sub(r"!=|\\neq?(?![a-zA-Z])", r"\\ne ", s)
    s = re.sub(r"\\lt(?![a-zA-Z])", "<", s)
    s = re.sub(r"\\gt(?![a-zA-Z])", ">", s)
    s = re.sub(r"\\varnothing|\\\{\s*\\\}", r"\\emptyset", s)
    s = re.sub(r"\\langle(?![a-zA-Z])", "(", re.sub(r"\\rangle(?![a-zA-Z])", ")", s))  # a vector <1, 2>
    s = s.replace("\\mathbb{R}", "(-\\infty,\\infty)")
    s = _approx(s)
    s = _fix_args(s)
    s = re.sub(r"(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating, s)
    s = re.sub(r"(^|[(\[{,;])\s*\+", r"\1", s)  # +\infty, (2, +3)
    s = re.sub(r"\s*,\s*(?:,\s*)+", ", ", s)  # "19, 46, and 82": the "and" left an empty item
    s = re.sub(r"\s+", " ", s).strip().strip(",").rstrip(".\\").strip()
    m = re.fullmatch(r"((?:%s)\s*=\s*)?(-?[1-9]\d{0,2}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?)" % _NAME, s)
    if m:  # 32,348 or x = 32,348 or 1 000 as a whole answer
        s = (m.group(1) or "") + re.sub("[, ]", "", m.group(2))
    s = re.sub(r"^\(([A-E])\)$", r"\1", s)  # a multiple-choice letter
    return s


def _approx(s):
    """"\\frac23 \\approx 0.67" is its exact value; "x \\approx 11" and "\\approx 8.24" give theirs."""
    i = s.find("\\approx")
    if i < 0:
        return s
    lhs, rhs = s[:i].strip(), s[i + len("\\approx"):].split("\\approx")[0].strip()
    if not lhs:
        return rhs
    return lhs + " = " + rhs if re.fullmatch(_NAME, lhs) else lhs


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


def _key(s):
    return re.sub(r"\s+", "", s)


# ---------------------------------------------------------------- 3. structure

_OPEN, _CLOSE = "([{", ")]}"
# a name: x, AB, \alpha, m_{max}, f^{-1}(x), g(x, 2) (not f(2x)), y', \dot{x}, dx/dt, and |AB|, V_1:V_2,
# \frac{NO}{BO}
_ARG = r"(?:[A-Za-z]|-?\d+)"
_ATOM = (r"(?:(?:[A-Za-z]+|\\(?!(?:%s)(?![a-zA-Z]))[a-zA-Z]+)(?:_\{[^{}]*\}|_[A-Za-z0-9])?(?:\^\{?-1\}?)?"
         r"(?:\(\s*%s(?:\s*,\s*%s)*\s*\))?'*|\\d?dot\{[A-Za-z]\}|\\frac\{d\s*[A-Za-z]?\}\{d\s*[A-Za-z]\})"
         % (_FUNCS, _ARG, _ARG))
_NAME = r"%s(?:\s*:\s*%s)?|\|\s*%s\s*\||\\frac\{%s\}\{%s\}|\(\s*%s(?:\s*,\s*%s)*\s*\)" % ((_ATOM,) * 7)


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


def _equiv(p, g, leaf):
    if not p or not g:
        return False
    if _key(p) == _key(g):
        return True
    np_, ng = _named(p), _named(g)
    if np_ and ng:  # both sides name their values (a=1, b=2 vs a=2, b=1): names must pair too
        return _multiset_equal(np_, ng, lambda x, y: x[0] == y[0] and _equiv_one(x[1], y[1], leaf))
    if np_ or ng:  # x = 2, y = 3 against a tuple (or (x, y) = a tuple): the pair (2, 3)
        other = g if np_ else p
        other = _value(_sides(other)) or other
        if _group(other) and _equiv_one("(%s)" % ",".join(v for _, v in np_ or ng), other, leaf):
            return True
    ps, gs = _elements(p), _elements(g)  # a list is the set of its items: a repeat counts once
    ps, gs = list({_key(e): e for e in ps}.values()), list({_key(e): e for e in gs}.values())
    if len(ps) == 1 and len(gs) == 1:
        return _equiv_one(ps[0], gs[0], leaf)
    if _multiset_equal(ps, gs, lambda x, y: _equiv_one(x, y, leaf)):
        return True
    # 1,22 against a gold of 1.22: a decimal comma; in a gold, 2,4 is a list (two roots)
    m = re.fullmatch(r"(-?\d+),(\d+)", p)
    return bool(m and "." in g and len(gs) == 1 and _equiv_one("%s.%s" % m.groups(), g, leaf))


def _named(s):
    """[(name, value), ...] if s lists 2+ elements, each "name = value"; else None."""
    pairs = [_split(e, ["="]) for e in _split(s, [",", ";"])]
    if len(pairs) >= 2 and all(len(q) == 2 and re.fullmatch(_NAME, q[0]) for q in pairs):
        return [(re.sub(r"[\s{}]", "", q[0]), q[1]) for q in pairs]  # a_{3} is a_3
    return None


def _elements(s):
    """The answers a string lists: split at top-level \\cup, a set's braces dropped (so a union of
    sets lists their elements), split at top-level , and ; (only ; if both: "p=5,q=2; p=7,q=2");
    "p=5, q=2" becomes the tuple (5,2), "x \\in" is dropped, inequalities become intervals, and ±
    is expanded into both signs."""
    out = []
    for part in _split(s, ["\\cup"]):
        part = re.sub(r"^(?:%s)\s*\\in\s*" % _NAME, "", part)  # x \in S is S
        part = re.sub(r"^\\\{\s*(?:%s)\s*(?:\\mid|\||:)\s*(.+)\\\}$" % _NAME, r"\1", part)  # \{x | x > 0\}
        # a part is a set only if its brace closes at its very end: \{1\} \cup \{2\} is two sets
        if part.startswith("\\{") and part.endswith("\\}") and _closes_at_end(part[1:]):
            part = part[2:-2]
        elif part.startswith("{") and _closes_at_end(part) and len(_split(part[1:-1], [","])) > 1:
            part = part[1:-1]
        seps = [";"] if len(_split(part, [";"])) > 1 and len(_split(part, [","])) > 1 else [",", ";"]
        for e in _split(part, seps):
            named = _named(e)
            if named:
                e = "(" + ",".join(v for _, v in named) + ")"
            e = _inequality(re.sub(r"^(?:" + _NAME + r")\s*\\in\s*", "", e))
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


def _inequality(s):
    """a < x <= b -> (a,b]; x >= a -> [a,\\infty); -x > -1 -> (-\\infty,1); else unchanged."""
    parts = re.split(r"\s*(<|>|\\le(?![a-zA-Z])|\\ge(?![a-zA-Z]))\s*", s)
    if len(parts) == 3:  # -x > -1 is x < 1
        for k in (0, 2):
            if parts[k].startswith("-") and re.fullmatch(_NAME, parts[k][1:].strip()):
                o = parts[2 - k]
                parts[2 - k] = o[1:] if re.fullmatch(r"-[\d.]+", o) else "-(%s)" % o
                parts[k] = parts[k][1:].strip()
                parts[1] = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le"}[parts[1]]
                break
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


def _equiv_one(a, b, leaf):
    if isinstance(a, tuple) or isinstance(b, tuple):  # rows of a matrix
        return isinstance(a, tuple) and isinstance(b, tuple) and _groups_equal(a, b, leaf)
    if not a or not b:
        return False
    if _key(a) == _key(b):
        return True
    ea, eb = _sides(a), _sides(b)
    va, vb = _value(ea), _value(eb)
    if va is not None and vb is not None:  # x = 5 and y = 5: a name is the problem's, its value the answer
        if _equiv_one(va, vb, leaf):
            return True
        if not re.search(r"[A-Za-z]", va + vb):
            return False  # x = 5 and y = 6 cannot be scaled equations
    if len(ea) == 2 and len(eb) == 2:  # equations: same sides, swapped, or scaled
        return (_equiv_one(ea[0], eb[0], leaf) and _equiv_one(ea[1], eb[1], leaf)) or \
            (_equiv_one(ea[0], eb[1], leaf) and _equiv_one(ea[1], eb[0], leaf)) or \
            leaf("%s-(%s)" % tuple(ea), "%s-(%s)" % tuple(eb), scaled=True)
    if len(ea) == 2 or len(eb) == 2:  # an equation against a value: only a named value can match
        return (va is not None and _equiv_one(va, b, leaf)) or (vb is not None and _equiv_one(a, vb, leaf))
    ga, gb = _group(a), _group(b)
    if ga and gb:
        return _groups_equal(ga, gb, leaf)
    if ga or gb:  # a group against a non-group: only a scaled matrix can still match
        return "\\begin" in a + b and leaf(a, b)
    return leaf(a, b)


def _sides(s):
    """[lhs, rhs] of an equation (a chain a = b = c is [a, c]: it ends at its answer), else [s]."""
    sides = _split(s, ["="])
    return [sides[0], sides[-1]] if len(sides) > 1 and all(sides) else [s]


def _value(sides):
    """The value an equation states: its rhs if the lhs is a name, or if both sides are numbers
    (5+5+1 = 11); None for other equations and for non-equations."""
    if len(sides) != 2:
        return None
    lhs, rhs = sides
    constant = not re.search(r"[A-Za-z]", re.sub(r"\\(?:%s)(?![a-zA-Z])" % _FUNCS, "", lhs + rhs))
    return rhs if constant or re.fullmatch(_NAME, lhs) else None


def _group(s):
    """A tuple / interval / matrix as (open, items, close), or None for anything else."""
    m = re.fullmatch(r"[(\[]?\s*\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?"
                     r"((?:(?!\\end\{).)*)\\end\{\1\}\s*[)\]]?", s, re.S)  # [\begin{array}..\end{array}]
    if m:
        rows = [[c.strip() for c in r.split("&")] for r in m.group(2).split("\\\\") if r.strip()]
        if len(rows) == 1 or all(len(r) == 1 for r in rows):  # a vector is a tuple
            return "(", [c for r in rows for c in r], ")"
        return "M", [("[", r, "]") for r in rows], "M"
    if re.match(r"[A-Za-z][(\[]", s) and s[1] + s[-1] in ("(]", "[)"):
        s = s[1:]  # "t(0,4]": a half-open interval cannot be a function call, the t is a stray name
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        items = _split(s[1:-1], [","])
        if len(items) == 1:  # (0;0;6)
            items = _split(s[1:-1], [";"])
        if len(items) >= 2:
            return s[0], items, s[-1]
    return None


def _groups_equal(ga, gb, leaf):
    (oa, xs, ca), (ob, ys, cb) = ga, gb
    return oa == ob and ca == cb and len(xs) == len(ys) and \
        all(_equiv_one(x, y, leaf) for x, y in zip(xs, ys))


# ---------------------------------------------------------------- 4. leaves

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"  # unambiguous: no quadratic backtracking
_BASE = re.compile(r"(-?[0-9A-Z]+)_\{?(\d+)\}?")
_TIME = re.compile(r"(\d{1,2}):(\d\d)(?::(\d\d))?")


class _NeedSympy(Exception):
    pass


def _leaf_fast(a, b, scaled=False):
    """Decide a leaf without sympy, or raise _NeedSympy."""
    a, b = a.lstrip("+"), b.lstrip("+")
    if _key(a) == _key(b):
        return not scaled or bool(re.search(r"[A-Za-z]", a))  # "x-(1)" is an equation, "3-(3)" is not
    if scaled:
        raise _NeedSympy
    ba, bb = _BASE.fullmatch(a), _BASE.fullmatch(b)
    if ba or bb:  # 52_8: a numeral in base 8; against a bare numeral, the digits are what was asked
        if ba and bb:
            return ba.groups() == bb.groups()
        return (ba or bb).group(1) == (b if ba else a)
    if ":" in a + b:  # times (20:34 = 20:34:00) and ratios (2:4 = 1:2); never a division by 0
        ta, tb = _TIME.fullmatch(a), _TIME.fullmatch(b)
        if ta and tb:
            return [int(x or 0) for x in ta.groups()] == [int(x or 0) for x in tb.groups()]
        v = [_number(x) for x in _split(a, [":"]) + _split(b, [":"])]
        if len(v) == 4 and None not in v and not (ta or tb):
            return v[0] * v[3] == v[1] * v[2] and v[1] * v[3] != 0
        return False
    if _is_word(a) or _is_word(b):
        return _key(a).lower() == _key(b).lower()
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    raise _NeedSympy


def _is_percent_of(a, b):
    """Is a "X%" (or "X percent") and b the plain number X/100?"""
    m = re.fullmatch(r"\s*\$?\s*(-?\d+(?:\.\d+)?)\s*(?:\\?%|\\text\{\s*\\?%\s*\}|percent)\s*\$?\s*", a)
    return bool(m) and _number(normalize(b)) == Fraction(m.group(1)) / 100


def _is_word(s):
    return re.fullmatch(r"[A-Za-z][A-Za-z ]{2,}|[Nn][Oo]", s) is not None  # not "mn": a product


def _number(s):
    """An exact Fraction for a plain number (integers, decimals, a/b, \\frac{a}{b}, mixed numbers,
    1.5e3, 1.5 \\times 10^{3}), else None."""
    if len(s) > MAX_DIGITS:
        return None
    m = re.fullmatch(r"\s*(\d+)\s+(\d+)\s*/\s*(\d+)\s*", s)
    if m and int(m.group(3)):  # 1 1/2
        return int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
    if re.search(r"\d\s+\d", s):
        return None  # "2 3" is not 23
    s = s.replace(" ", "")
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


def _equiv_sympy(p, g):
    """_equiv with sympy leaves: what the worker runs (bounded.Pool calls it by name)."""
    return _equiv(p, g, _leaf_sympy)


def _leaf_sympy(a, b, scaled=False):
    """_leaf_fast, else parse both with latex2sympy2_extended and compare numerically."""
    try:
        return _leaf_fast(a, b, scaled)
    except _NeedSympy:
        pass
    if max(len(a), len(b)) > MAX_SYMPY:
        return False
    import sympy
    x, y = _parse(a.lstrip("+")), _parse(b.lstrip("+"))
    if x is None or y is None or any(e.has(sympy.zoo, sympy.nan) for e in (x, y)):
        return False  # unparsed, or undefined: never equal
    if x == y and not scaled:
        return True
    mx, my = [getattr(v, "is_Matrix", False) for v in (x, y)]
    if mx or my:
        if not (mx and my) or scaled:
            return False
        x, y = sympy.Matrix(x.doit()), sympy.Matrix(y.doit())
        return x.shape == y.shape and all(_expr_equal(u, v) for u, v in zip(x, y))
    if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
        return False  # sets, relations, ... that the rules above did not take apart
    return _proportional(x, y) if scaled else _expr_equal(x, y)


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
    if not hasattr(e, "has"):
        return None  # a list, a tuple: nothing the rules above did not already take apart
    if sympy.Symbol("i") in e.free_symbols:
        e = e.xreplace({sympy.Symbol("i"): sympy.I})  # in an answer, i is the imaginary unit
    return e


def _points(x, y):
    """Four fixed points for the free symbols of x and y. Each symbol takes a negative value and one
    in (0, 1), so x and |x|, \\sqrt{x^2}, \\max(x, 0) part, and larger ones of different sizes, so
    floor(m/2) and floor(m/3) part; the symbols take them in different orders, so that the points
    are not on one line (where x - 2y + z would be constant). One empty point if there are no symbols."""
    import sympy
    syms = sorted(x.free_symbols | y.free_symbols, key=str)
    scales = [sympy.Rational(n, d) for n, d in ((-13, 11), (3, 7), (101, 9), (257, 13))]
    return [{s: scales[(k + j) % 4] + sympy.Rational(j, 7) for j, s in enumerate(syms)}
            for k in range(len(scales) if syms else 1)], bool(syms)


def _finite(*values):
    import sympy
    return all(v.is_number and not v.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) for v in values)


def _expr_equal(x, y):
    """Equal at 30 digits (rel. 1e-20) at the fixed points; else simplify(x - y) == 0."""
    import sympy
    points, has_syms = _points(x, y)
    seen = 0
    for pt in points:
        try:
            u, v = x.evalf(30, subs=pt), y.evalf(30, subs=pt)
        except Exception:
            continue
        if not (u.is_number and v.is_number):
            continue
        if not _finite(u, v):
            if has_syms:
                continue  # a pole of one point says nothing
            return u == v and not u.has(sympy.zoo, sympy.nan)  # oo = oo; an undefined value never
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


def _proportional(x, y):
    """Is x = c * y for a constant c != 0 at every fixed point (lhs - rhs of two scaled equations)?"""
    import sympy
    points, has_syms = _points(x, y)
    ratio = None
    for pt in points if has_syms else []:
        try:
            u, v = sympy.N(x.evalf(30, subs=pt), 30), sympy.N(y.evalf(30, subs=pt), 30)
        except Exception:
            return False
        if not _finite(u, v) or (u == 0) != (v == 0):
            return False
        if u == 0:
            continue
        r = u / v
        if ratio is None:
            ratio = r
        elif abs(r - ratio) > 1e-20 * abs(ratio):
            return False
    return ratio is not None
