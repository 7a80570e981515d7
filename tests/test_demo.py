"""demo.py end to end on a shortened run: every step runs, the report files exist and parse, and a rerun
resumes from disk instead of redoing the work. (The full run's claims -- length down, accuracy held --
are measured by `python demo.py`, not asserted here: a 40-step SFT base is not a long thinker.)"""

import dataclasses
import json

import pytest

import demo


@pytest.mark.slow
def test_shortened_demo_writes_a_complete_report_and_resumes(tmp_path):
    cfg = demo.DemoConfig(
        out_dir=str(tmp_path), toy=dict(steps=40, n_train=400, n_val=20, n_test=30, threads=1),
        train=dict(prompts_per_step=4, samples_per_prompt=4, lr=1e-4, kl_coef=0.0, entropy_coef=0.0,
                   micro_batch_size=16, rollout_batch=16, save_every=2, sample_every=0, seed=0, device="cpu"),
        stages=[dict(limit=120, steps=2), dict(limit=100, steps=2)], val_n_problems=20, test_n_problems=30,
        max_new_tokens=300, budgets=[40, 80])
    report = demo.main(cfg)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    for key in ("base", "pruned", "direct"):
        assert set(report[key]) == {"accuracy", "mean_length", "wait_per_completion"}
        assert 0 <= report[key]["accuracy"] <= 1 and report[key]["mean_length"] > 0
    pruned_len = round(report["pruned"]["mean_length"])
    assert [b["budget"] for b in report["budget_forcing"]] == sorted({40, 80, pruned_len})
    assert [s["limit"] for s in report["stages"]] == [120, 100]
    assert all(s["selected_step"] in (2, 4) for s in report["stages"])
    # direct pruning: one stage at the last limit with as many steps as the whole schedule
    direct = json.loads((tmp_path / "direct" / "schedule.json").read_text())
    assert [(s["limit"], s["overrides"]["steps"]) for s in direct["stages"]] == [(100, 4)]
    for name in ("report.md", "acc_vs_length.png", "thinkprune/report.md", "thinkprune/training.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a second run finds everything on disk: same numbers, no retraining (the base's mtime is unchanged)
    mtime = (tmp_path / "base" / "model.safetensors").stat().st_mtime
    again = demo.main(cfg)
    assert {k: again[k] for k in ("base", "pruned", "direct", "budget_forcing", "stages")} == \
        {k: report[k] for k in ("base", "pruned", "direct", "budget_forcing", "stages")}
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime == mtime
    # other test settings: the test evaluations are redone (one sample more per problem), the training is not
    more = demo.main(dataclasses.replace(cfg, test_samples=2))
    assert json.loads((tmp_path / "test.json").read_text())["base"]["n_completions"] == 2 * 30
    assert more["stages"] == report["stages"]
    # another base: refused, not answered with the one on disk
    with pytest.raises(ValueError, match="steps"):
        demo.main(dataclasses.replace(cfg, toy={**cfg.toy, "steps": 41}))
