"""
The testbed: length-control methods x final limits x RL seeds on the embedded task, from one base, every
run scored on one held-out test set; a Pareto plot with seed error bars, and the claims checked as measured.

    python sweep.py                                            # configs/sweep.py, into runs/sweep/
    python sweep.py configs/sweep.py --seeds=[0] --limits=[80]  # --key=value overrides (lists as JSON)

For each (limit, method, seed): `schedule.run_schedule` from the base over the method's `ladder` of
limits (fractions of the final limit: ThinkPrune's iterative pruning falls in stages, every other method
trains at the final limit alone), `steps` RL steps in all, each stage's checkpoint selected on the
validation set by the paper's rule; the final selection is scored on the test set with no length prompt.
The base, and budget forcing of the base at `budgets`, are scored on the same test set.

Choices:
- Every run has the same total steps, data, evaluation seed (common random numbers) and validation rule;
  runs differ in their method's train.Config keys and in the RL seed (data order and samples). The base's
  validation, the selection rule's bar, is the same for all of them: done once and handed to each run.
- Resumable: a finished run's test result is kept in results.json and skipped on a rerun; an unfinished
  one resumes inside run_schedule. Other evaluation or base settings: refused, not mixed.
- A claim "holds" when its effect is larger than twice the combined standard error over seeds (or, for
  thresholds such as "length down 50%", when the seed means pass them); the report gives the numbers.
Outputs in out_dir: report.json, report.md, pareto.png, by_difficulty.png (report.py writes them).
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import report
import schedule
import toy
from config import check, load_config
from data import load_problems


@dataclass
class SweepConfig:
    out_dir: str = "runs/sweep"
    toy: dict = field(default_factory=dict)  # toy.ToyConfig overrides; the base is built once in out_dir/base
    train: dict = field(default_factory=dict)  # train.Config overrides shared by every run
    # name -> train.Config overrides, and optionally "ladder": the stages' limits as fractions of the final one
    methods: dict = field(default_factory=dict)
    limits: list = field(default_factory=list)  # final limits (tokens)
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # RL seeds
    steps: int = 60  # RL steps per run, split evenly over a ladder's stages
    val_n_problems: int = 0  # 0 = all of val.jsonl
    val_samples: int = 1
    test_n_problems: int = 0
    test_samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.95
    eval_batch: int = 256
    budgets: list = field(default_factory=list)  # budget forcing of the base
    answer_budget: int = 16
    seed: int = 0  # the evaluation seed, shared by every run

    def check(self):
        check(bool(self.methods) and bool(self.limits) and bool(self.seeds), "methods/limits/seeds",
              (len(self.methods), len(self.limits), len(self.seeds)), "give at least one of each")
        for name, m in self.methods.items():
            check(isinstance(m, dict), f"methods.{name}", m, "a dict of train.Config overrides")
            ladder = m.get("ladder", [1.0])
            check(isinstance(ladder, list) and ladder and ladder[-1] == 1.0, f"methods.{name}.ladder", ladder,
                  "fractions of the final limit, ending at 1.0")
            check(self.steps >= len(ladder), "steps", self.steps, f"at least one step per stage of {name}")
        check(all(isinstance(L, int) and L >= 1 for L in self.limits), "limits", self.limits, "token counts >= 1")
        for L in self.limits:
            for name in self.methods:
                schedule_config(self, "check", stages(self, name, L, 0)).check()


def stages(cfg: SweepConfig, method: str, limit: int, seed: int) -> list[dict]:
    over = {k: v for k, v in cfg.methods[method].items() if k != "ladder"}
    ladder = cfg.methods[method].get("ladder", [1.0])
    steps = [cfg.steps // len(ladder) + (i < cfg.steps % len(ladder)) for i in range(len(ladder))]
    return [{**over, "limit": round(f * limit), "steps": s, "seed": seed} for f, s in zip(ladder, steps)]


def schedule_config(cfg: SweepConfig, name: str, stage_list: list, test: bool = False) -> schedule.ScheduleConfig:
    """A run's schedule (validation on val.jsonl), or with test=True the same settings on test.jsonl."""
    out, data = Path(cfg.out_dir), Path(cfg.out_dir) / "data"
    return schedule.ScheduleConfig(
        model=str(out / "base"), out_dir=str(out / "runs" / name), stages=stage_list, report=False,
        train={"train_data": str(data / "train.jsonl"), **cfg.train},
        val_data=str(data / ("test.jsonl" if test else "val.jsonl")),
        val_n_problems=cfg.test_n_problems if test else cfg.val_n_problems,
        val_samples=cfg.test_samples if test else cfg.val_samples, val_max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, eval_batch=cfg.eval_batch,
        answer_budget=cfg.answer_budget)


def score(cfg: SweepConfig, difficulty: dict, path: str, name: str, budget: int | None = None) -> dict:
    """The test-set numbers of one checkpoint: accuracy, lengths, "Wait"s and accuracy by difficulty."""
    res = schedule.validate(schedule_config(cfg, name, [], test=True), path, f"test_{name}", Path(cfg.out_dir),
                            budget)
    by = {}
    for p in res["problems"]:
        by.setdefault(str(difficulty[p["id"]]), []).append(p["accuracy"])
    return {**report.headline(res), "truncation_rate": res["truncation_rate"],
            "by_difficulty": {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))}}


def main(cfg: SweepConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    toy.ensure_base(toy.ToyConfig(out=str(out), **cfg.toy))
    difficulty = {r["id"]: r["difficulty"] for r in load_problems(out / "data" / "test.jsonl")}
    path = out / "results.json"
    settings = {f"{split}.{k}": getattr(schedule_config(cfg, "", [], test=split == "test"), k)
                for split in ("val", "test") for k in schedule.VALIDATION_KEYS}
    done = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "runs": {}, "seconds": 0.0}
    if done["settings"] != settings:
        diff = [k for k in settings if done["settings"].get(k) != settings[k]]
        raise ValueError(f"{path}: made with other evaluation settings ({', '.join(diff)}); use another out_dir")

    def save(key, value):
        done[key] = value
        report.write_json(path, done)

    if "base" not in done:
        save("base", score(cfg, difficulty, str(out / "base"), "base"))
    forcing = done.setdefault("budget_forcing", {})
    for B in cfg.budgets:
        if str(B) not in forcing:
            forcing[str(B)] = {"budget": B, **score(cfg, difficulty, str(out / "base"), f"base_budget{B}", B)}
            save("budget_forcing", forcing)
    if "base_val" not in done:  # the selection rule's bar, the same for every run: validated once
        save("base_val", schedule.validate(schedule_config(cfg, "", []), str(out / "base"), "val_base", out))
    todo = [(L, m, s) for L in cfg.limits for m in cfg.methods for s in cfg.seeds]
    from tqdm import tqdm
    for L, m, s in tqdm(todo, desc="sweep", unit="run", dynamic_ncols=True):
        name = f"{m}_L{L}_s{s}"
        if name in done["runs"]:
            continue
        state = schedule.run_schedule(schedule_config(cfg, name, stages(cfg, m, L, s)), base=done["base_val"])
        res = score(cfg, difficulty, state["stages"][-1]["selected"]["path"], name)
        done["runs"][name] = {"method": m, "limit": L, "seed": s, **res}
        save("runs", done["runs"])
        print(f"[sweep] {name}: accuracy {100 * res['accuracy']:.1f}%, mean length {res['mean_length']:.1f}", flush=True)
    save("seconds", round(done["seconds"] + time.time() - t0, 1))
    runs = [r for r in done["runs"].values() if r["method"] in cfg.methods and r["limit"] in cfg.limits
            and r["seed"] in cfg.seeds]
    bf = sorted((p for p in forcing.values() if p["budget"] in cfg.budgets), key=lambda p: p["budget"])
    summary = {"runs": runs, "base": done["base"], "budget_forcing": bf,
               "claims": claims(runs, done["base"], bf, min(cfg.limits)), "seconds": done["seconds"],
               "commit": report.commit()}
    report.sweep_report(summary, out)
    return summary


# ---- the claims ------------------------------------------------------------------------------------------

def stats(runs: list[dict], method: str, limit: int, key: str = "accuracy") -> tuple[float, float, int]:
    """Mean, standard error over seeds and the number of seeds of `key` for one (method, limit)."""
    xs = [r[key] for r in runs if r["method"] == method and r["limit"] == limit]
    if not xs:
        return math.nan, math.nan, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd / math.sqrt(len(xs)), len(xs)


def compare(runs, a: str, b: str, limit: int) -> tuple[float, float, str]:
    """Accuracy difference a - b, its combined standard error, and the sentence that states both."""
    (ma, sa, na), (mb, sb, nb) = stats(runs, a, limit), stats(runs, b, limit)
    se = math.sqrt(sa ** 2 + sb ** 2)
    text = (f"at L={limit}: {a} {100 * ma:.1f}% vs {b} {100 * mb:.1f}% ({na} and {nb} seeds), difference "
            f"{100 * (ma - mb):+.1f} points, combined standard error {100 * se:.1f}")
    return ma - mb, se, text


def claims(runs: list[dict], base: dict, forcing: list[dict], tight: int) -> list[dict]:
    out, methods = [], sorted({r["method"] for r in runs})
    limits = sorted({r["limit"] for r in runs})
    if "thinkprune" in methods:
        for L in limits:
            acc, _, n = stats(runs, "thinkprune", L)
            length, _, _ = stats(runs, "thinkprune", L, "mean_length")
            cut = 1 - length / base["mean_length"]
            out.append({"claim": f"ThinkPrune at L={L} cuts length >= 50% within 2 points of the base",
                        "held": bool(cut >= 0.5 and acc >= base["accuracy"] - 0.02),
                        "detail": f"length {base['mean_length']:.1f} -> {length:.1f} ({100 * cut:.0f}% shorter), "
                                  f"accuracy {100 * base['accuracy']:.1f}% -> {100 * acc:.1f}% (mean of {n} seeds)"})
        if forcing:
            acc, _, _ = stats(runs, "thinkprune", tight)
            length, _, _ = stats(runs, "thinkprune", tight, "mean_length")
            bf = interpolate([(p["mean_length"], p["accuracy"]) for p in forcing], length)
            out.append({"claim": f"budget forcing of the base at ThinkPrune's length (L={tight}) is worse",
                        "held": bool(bf < acc), "detail": f"at {length:.1f} tokens: budget forcing {100 * bf:.1f}% "
                        f"(interpolated between budgets), ThinkPrune {100 * acc:.1f}%"})
    for a, b, claim in (("thinkprune", "direct", "iterative pruning beats direct pruning at the tighter limit"),
                        ("dler", "direct", "DLER's optimisation beats plain GRPO at equal limit")):
        if a in methods and b in methods:
            d, se, text = compare(runs, a, b, tight)
            out.append({"claim": claim, "held": bool(d > 2 * se and d > 0), "detail": text})
    policies = [m for m in ("direct", "keep", "mask", "soft") if m in methods]
    if len(policies) > 1:
        ranked = sorted(policies, key=lambda m: -stats(runs, m, tight)[0])
        d, se, _ = compare(runs, ranked[0], ranked[1], tight)
        out.append({"claim": f"one truncation policy gives the best accuracy at L={tight} (zero = direct)",
                    "held": bool(d > 2 * se and d > 0),
                    "detail": "; ".join(f"{m}: {100 * stats(runs, m, tight)[0]:.1f}% at "
                                        f"{stats(runs, m, tight, 'mean_length')[0]:.1f} tokens" for m in ranked)})
    pairs = [(abs(compare(runs, a, b, tight)[0]) / max(compare(runs, a, b, tight)[1], 1e-12), a, b)
             for i, a in enumerate(methods) for b in methods[i + 1:]]
    if pairs:
        z, a, b = max(pairs)
        out.append({"claim": f"the testbed tells methods apart at L={tight} (a difference > 3 standard errors)",
                    "held": bool(z > 3), "detail": f"largest: {a} vs {b}, {z:.1f} standard errors"})
    return out


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of y at x through points (x, y) sorted by x; the end values outside them."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return points[-1][1]


if __name__ == "__main__":
    default = str(Path(__file__).resolve().parent / "configs" / "sweep.py")
    path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else default
    main(load_config(path, [a for a in sys.argv[1:] if a.startswith("--")], SweepConfig))
