# The length-control sweep on the embedded task (python sweep.py): every method at two final limits, three
# RL seeds each, from one base. The toy task's necessary lengths run 42-90 tokens (65 on average): L=100
# leaves room for the longest chains, L=70 is below them, where a method must trade accuracy for length.
out_dir = "runs/sweep"
toy = dict()  # the demo's base settings (toy.ToyConfig defaults), built once in runs/sweep/base
train = dict(
    prompts_per_step=16,
    samples_per_prompt=8,
    lr=1e-4,  # the demo's: a 0.6M model moves at 1e-4
    kl_coef=0.0,
    entropy_coef=0.0,
    micro_batch_size=64,
    rollout_batch=128,
    save_every=5,  # candidates for the selection rule
    sample_every=0,
    device="cpu",
)
methods = {
    "thinkprune": dict(ladder=[1.4, 1.2, 1.0]),  # iterative pruning: 1.4L -> 1.2L -> L
    "direct": dict(),  # one stage at L: plain GRPO, reward 0 when cut (truncation="zero")
    "dler": dict(adv_norm="batch", clip_eps_high=0.28, dynamic_sampling=True),
    "keep": dict(truncation="keep"),
    "mask": dict(truncation="mask"),
    "soft": dict(truncation="soft", soft_buffer=20),
    "kimi": dict(length_penalty="kimi", length_coef=0.5),
}
limits = [100, 70]
seeds = [0, 1, 2]
steps = 30  # per run, split over ThinkPrune's three stages
val_n_problems = 100
test_n_problems = 300
budgets = [40, 60, 80, 100, 120]
