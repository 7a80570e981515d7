"""memory.py and bench/plan.py: the memory plan's exact figures against the bytes of real tensors at small
shapes (weights, FSDP2 shards on two ranks, gradients, AdamW states, the KV cache, what autograd saves in a
block), the verdicts it gives the shipped configs, and the CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # after the root: bench/rollout.py must not shadow rollout.py
import memory  # noqa: E402
import plan  # noqa: E402
import train  # noqa: E402
from model import KVCache, ModelArgs, Transformer, rope_angles  # noqa: E402

# odd sizes on purpose: 211 vocabulary rows do not split evenly over 2 ranks, so FSDP pads
TINY = dict(vocab_size=211, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
CFG = train.Config(prompts_per_step=4, samples_per_prompt=3, rollout_batch=5, max_prompt_tokens=7, limit=11,
                   micro_batch_size=2, kl_coef=0.001)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gb(n: int):
    return pytest.approx(n / memory.GB, rel=1e-12, abs=0)


@pytest.mark.parametrize("tied", [False, True])
def test_one_gpu_figures_are_the_bytes_of_the_real_fp32_tensors(tied):
    args = ModelArgs(**TINY, tie_word_embeddings=tied)
    p = memory.plan(args, CFG, gpus=1, gpu_mem_gb=80)  # one process: fp32, no FSDP, as train.py runs it
    model = Transformer(args).init_weights()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 211, (2, 5))).sum().backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]  # exp_avg, exp_avg_sq (not step)
    assert p["update"]["weights"] == gb(nbytes(model.parameters()))
    assert p["update"]["grads"] == gb(nbytes(q.grad for q in model.parameters()))
    assert p["update"]["optimizer"] == gb(nbytes(states))
    assert p["update"]["reference"] == gb(nbytes(model.parameters()))  # kl_coef > 0: a second fp32 copy
    cache = KVCache(args, 5, 7 + 11, dtype=torch.float32)  # rollout_batch slots, max prompt + limit positions
    assert p["rollout"]["kv_cache"] == gb(nbytes([cache.k, cache.v]))
    assert p["rollout"]["gathered"] == 0 and p["update"]["fsdp_buffers"] == 0


def test_bf16_figures_are_the_bytes_of_the_real_bf16_tensors():
    args = ModelArgs(**TINY)
    p = memory.plan(args, replace(CFG, rollout_batch=100), gpus=1, gpu_mem_gb=80, fsdp=True)
    cache = KVCache(args, 12, 7 + 11, dtype=torch.bfloat16)  # 4 prompts x 3 samples: the slots stop at the rows
    assert p["rollout_batch"] == 12
    assert p["rollout"]["kv_cache"] == gb(nbytes([cache.k, cache.v]))
    assert p["rollout"]["gathered"] == gb(nbytes(Transformer(args).to(torch.bfloat16).parameters()))


def test_block_activations_are_what_autograd_saves():
    """Every tensor saved for backward by one bf16 block forward, counted once per storage (a view shares its
    base's), is what block_saved_bytes counts; parameters and the shared cos/sin are not activations."""
    args = ModelArgs(**TINY)
    model = Transformer(args).init_weights().to(torch.bfloat16)
    B, T = 2, 13
    x = torch.randn(B, T, args.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope_angles(pos, args.head_dim, args.rope_theta)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, pos, None, None, None)
    not_activations = {t.untyped_storage().data_ptr() for t in [cos, sin, x, *model.parameters()]}
    assert sum(n for ptr, n in saved.items() if ptr not in not_activations) == memory.block_saved_bytes(args, B * T, 2)


def _fsdp_rank(rank, init_file, out_file):
    from torch.distributed.fsdp import fully_shard
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = Transformer(ModelArgs(**TINY)).init_weights()
    for block in model.layers:  # train.load_model's recipe: each block, then the root
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 211, (2, 5))).sum().backward()
    opt.step()
    # a shard is a view into FSDP's padded storage: the storage is what the rank holds
    held = {"weights": sum(q.to_local().untyped_storage().nbytes() for q in model.parameters()),
            "grads": nbytes(q.grad.to_local() for q in model.parameters()),
            "optimizer": nbytes(t.to_local() for s in opt.state.values() for t in s.values() if t.dim() > 0)}
    Path(f"{out_file}.{rank}").write_text(json.dumps(held))
    torch.distributed.destroy_process_group()


def test_fsdp_shards_on_two_ranks_are_the_planned_bytes(tmp_path):
    """Rank 0's padded shards, gradients and AdamW states are the plan's figures; rank 1's are no larger."""
    mp.spawn(_fsdp_rank, args=(str(tmp_path / "init"), str(tmp_path / "held")), nprocs=2)
    p = memory.plan(ModelArgs(**TINY), CFG, gpus=2, gpu_mem_gb=80)
    r0, r1 = (json.loads((tmp_path / f"held.{r}").read_text()) for r in (0, 1))
    for key in ("weights", "grads", "optimizer"):
        assert p["update"][key] == gb(r0[key])
        assert r1[key] <= r0[key]
    assert r1["grads"] < r0["grads"]  # the padding is real: 211 rows split 106 + 105


def test_max_rollout_batch_is_the_largest_that_fits():
    args, cfg = ModelArgs(**TINY), replace(CFG, prompts_per_step=64, samples_per_prompt=16)
    rows = 64 * 16
    total = memory.plan(args, replace(cfg, rollout_batch=rows), 1, 80)["rollout"]["total"]
    assert memory.max_rollout_batch(args, cfg, 1, total) == rows  # all the rows fit: no more slots are useful
    mem = memory.plan(args, replace(cfg, rollout_batch=300), 1, 80)["rollout"]["total"]
    best = memory.max_rollout_batch(args, cfg, 1, mem)
    assert best >= 300
    assert memory.plan(args, replace(cfg, rollout_batch=best), 1, mem)["rollout"]["fits"]
    assert not memory.plan(args, replace(cfg, rollout_batch=best + 1), 1, mem)["rollout"]["fits"]
    assert memory.max_rollout_batch(args, cfg, 1, memory.RESERVE_GB) == 0  # not even the weights fit


def test_schedule_config_is_planned_at_its_largest_limit_with_overrides():
    cfg = plan.load_train_config(str(ROOT / "configs/thinkprune.py"), ["--rollout_batch=64", "--kl_coef=0"])
    assert (cfg.limit, cfg.rollout_batch, cfg.kl_coef, cfg.micro_batch_size) == (4000, 64, 0.0, 4)
    assert cfg.model == "models/DeepSeek-R1-Distill-Qwen-1.5B" and cfg.activation_checkpointing
    assert plan.load_train_config(str(ROOT / "configs/stage3.py"), []).limit == 2000
    with pytest.raises(ValueError, match="rollout_bach"):
        plan.load_train_config(str(ROOT / "configs/stage1.py"), ["--rollout_bach=64"])


def test_shipped_configs_fit_8_gpus_of_80gb_and_7b_at_256_slots_does_not():
    for path, shape in [("configs/thinkprune.py", "1.5B"), ("configs/stage1.py", "1.5B"),
                        ("configs/thinkprune_7b.py", "7B")]:
        p = memory.plan(ModelArgs(**plan.SHAPES[shape]), plan.load_train_config(str(ROOT / path), []), 8, 80)
        assert p["rollout"]["fits"] and p["update"]["fits"], path
    # issue 19: the 7B rollout at the 1.5B configs' 256 slots runs out of memory
    cfg = plan.load_train_config(str(ROOT / "configs/thinkprune.py"), [])
    p = memory.plan(ModelArgs(**plan.SHAPES["7B"]), cfg, 8, 80)
    assert not p["rollout"]["fits"] and p["rollout"]["kv_cache"] > 64


def test_cli_prints_one_json_line_and_asks_for_a_shape_without_the_model(tmp_path):
    run = subprocess.run([sys.executable, "bench/plan.py", "configs/thinkprune_7b.py", "--shape", "7B", "--gpus", "8",
                          "--gpu_mem_gb", "80"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 1, run.stderr
    out = json.loads(lines[0])
    assert out["rollout"]["fits"] and out["update"]["fits"] and out["max_rollout_batch"] >= 128
    assert out["params_B"] == 7.62 and out["rollout"]["gathered"] == 15.23  # bf16 weights, 7.6B parameters
    sys.argv = ["plan.py", "configs/stage1.py", f"--model={tmp_path}"]  # no config.json there
    with pytest.raises(SystemExit, match="--shape"):
        plan.main()


def test_auto_rollout_batch_is_planned_at_the_most_slots_that_fit(monkeypatch, capsys):
    """`--rollout_batch=auto` plans what train.py would resolve with gpu_mem_gb free: the largest that fits."""
    monkeypatch.setattr(sys, "argv", ["plan.py", str(ROOT / "configs/thinkprune_7b.py"), "--shape", "7B",
                                      "--rollout_batch=auto"])
    plan.main()
    out = json.loads(capsys.readouterr().out)
    assert out["rollout_batch"] == out["max_rollout_batch"] > 128 and out["rollout"]["fits"]
