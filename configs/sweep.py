# The length-control sweep on the embedded task (python sweep.py): every method at two final limits, three
# RL seeds each, from one base. The task's necessary lengths run 31-163 tokens (~100 on average, growing
# with the number of steps): L=175 leaves room for the longest chains, L=120 is below those of 9 steps and
# more, where a method must trade accuracy for length.
out_dir = "runs/sweep"
toy = dict()  # the demo's base settings (toy.ToyConfig defaults), built once in runs/sweep/base
train = dict(
    prompts_per_step=8,
    samples_per_prompt=8,
    lr=3e-4,  # the demo's
    temperature=0.7,  # near the evaluation's 0.6: at 1.0 this tiny model rambles where at 0.6 it does not
    kl_coef=0.0,
    entropy_coef=0.0,
    micro_batch_size=64,
    rollout_batch=64,
    save_every=6,  # candidates for the selection rule: one per ThinkPrune stage, three for one-stage methods
    sample_every=0,
    device="cpu",
)
methods = {
    "thinkprune": dict(ladder=[1.7, 1.3, 1.0]),  # iterative pruning: 1.7L -> 1.3L -> L (the demo's 300/230/175)
    "direct": dict(),  # one stage at L: plain GRPO, reward 0 when cut (truncation="zero")
    "dler": dict(adv_norm="batch", clip_eps_high=0.28, dynamic_sampling=True),
    "keep": dict(truncation="keep"),
    "mask": dict(truncation="mask"),
    "soft": dict(truncation="soft", soft_buffer=30),
    "kimi": dict(length_penalty="kimi", length_coef=0.5),
}
limits = [175, 120]
seeds = [0, 1, 2]
steps = 18  # per run, split over ThinkPrune's three stages (6 each): 42 runs in under an hour on 2 cores
val_n_problems = 100
test_n_problems = 300
max_new_tokens = 640
budgets = [60, 100, 140, 180]
