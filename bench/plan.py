"""
Memory plan per GPU for a training config, before anything is loaded: do the rollout and the update fit?

    python bench/plan.py configs/stage1.py --gpus 8 --gpu_mem_gb 80          # shape from the model dir's config.json
    python bench/plan.py configs/thinkprune_7b.py --shape 7B --gpus 8 --gpu_mem_gb 80
    python bench/plan.py configs/stage1.py --shape 1.5B --rollout_batch=128   # --key=value overrides the config

Prints one JSON line: GB (1e9 bytes) per GPU for what the rollout and the update hold, their totals, a
`fits` flag for each, and `max_rollout_batch`, the most KV-cache slots with which the rollout fits (the
rank's rows when they all fit); `rollout_batch=auto` is planned at that. A schedule config (`train` dict +
`stages`) is planned at its stage with the largest limit. The arithmetic, and what it counts, is
memory.py's, which train.py also uses to resolve `rollout_batch = "auto"` with the memory it finds free.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memory  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from model import ModelArgs  # noqa: E402

SHAPES = {  # the config.json fields of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B and -7B that the plan reads
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4),
}


def load_train_config(path: str, overrides: list[str]):
    """A train config as it is, or a schedule config's `train` dict with its stage of the largest limit;
    then `--key=value` overrides."""
    try:
        cfg = load_config(path, [], train.Config)
    except ValueError as e:
        if "unknown config key" not in str(e):  # a train config with a bad value
            raise
        from schedule import ScheduleConfig  # a schedule config, or its loader names the key it does not know
        s = load_config(path, [], ScheduleConfig)
        if not s.stages:
            raise ValueError(f"{path}: a schedule config without stages") from None
        stage = max(s.stages, key=lambda st: st["limit"])
        cfg = dataclasses.replace(train.Config(), **{**s.train, **stage, "model": s.model})
    given = load_config(None, overrides, train.Config)  # checks and converts each --key=value
    keys = [arg[2:].split("=", 1)[0] for arg in overrides]
    return dataclasses.replace(cfg, **{k: getattr(given, k) for k in keys})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("config", help="a train config (configs/stage1.py) or a schedule config (configs/thinkprune.py)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu_mem_gb", type=float, default=80.0)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="model shape, when the config's model dir is not at hand")
    a, overrides = ap.parse_known_args()
    cfg = load_train_config(a.config, overrides)
    if a.shape:
        args = ModelArgs(**SHAPES[a.shape])
    else:
        cfg_file = Path(cfg.model) / "config.json"
        if not cfg_file.is_file():
            sys.exit(f"{cfg_file}: not found; give --shape {'|'.join(SHAPES)} to plan without the checkpoint")
        args = ModelArgs.from_hf_config(json.loads(cfg_file.read_text()), where=str(cfg_file))
    best = memory.max_rollout_batch(args, cfg, a.gpus, a.gpu_mem_gb)
    if cfg.rollout_batch == "auto":  # as train.py resolves it, with gpu_mem_gb for the free memory
        cfg = dataclasses.replace(cfg, rollout_batch=max(best, 1))
    out = {"config": a.config, "model": cfg.model, "shape": a.shape or "config.json", "limit": cfg.limit,
           **memory.plan(args, cfg, a.gpus, a.gpu_mem_gb), "max_rollout_batch": best}
    print(json.dumps(_round(out)))


def _round(o):
    """GB to two decimals: the plan is an estimate beyond that."""
    if isinstance(o, dict):
        return {k: _round(v) for k, v in o.items()}
    return round(o, 2) if isinstance(o, float) else o


if __name__ == "__main__":
    main()
