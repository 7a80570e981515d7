# DLER (NVlabs, arXiv 2510.15110) on DeepSeek-R1-Distill-Qwen-1.5B: ThinkPrune's truncation reward (cut at
# 4000 tokens, reward 0) with the optimisation fixed: batch-wise advantage normalisation, clip-higher,
# dynamic sampling, token-mean loss. Values from NVlabs/DLER's dler_slurm.sh (veRL); each comment says
# where it differs from ThinkPrune's configs/stage1.py.
#   torchrun --nproc_per_node=8 train.py configs/dler.py
model = "models/DeepSeek-R1-Distill-Qwen-1.5B"  # local HF dir
out_dir = "runs/dler"
# train_data: the default, AIME 1983-2021 (907 problems). DLER trains on DeepScaleR-Preview (~40k problems),
# which is not in the shared data.
limit = 4000  # max_response_length; the same cutoff as ThinkPrune's first stage, reward 0 when cut
truncation = "zero"
max_prompt_tokens = 1024  # ThinkPrune: 768
prompts_per_step = 512  # train_prompt_bsz; ThinkPrune: 128
samples_per_prompt = 16  # n_resp_per_prompt, as ThinkPrune
minibatches = 8  # ppo_mini_batch_size 64 of 512 prompts: 8 optimizer steps per rollout batch; ThinkPrune: 1
ppo_epochs = 1
temperature = 1.0
lr = 1e-6  # constant, as ThinkPrune
weight_decay = 0.01
grad_clip = 1.0
clip_eps = 0.2
clip_eps_high = 0.28  # clip-higher (DAPO); ThinkPrune: symmetric 0.2
kl_coef = 0.0005  # kl_loss_coef (k3 in the loss); ThinkPrune: 0.001
entropy_coef = 0.0  # ThinkPrune: 0.001
adv_norm = "batch"  # reinforce_plus_plus_baseline: r - group mean, whitened over the batch; ThinkPrune: group std.
# (veRL whitens token-weighted; ours divides by the std over rows)
loss_agg = "token-mean"
dynamic_sampling = True  # filter_groups on seq_reward; ThinkPrune: off (zero-variance groups skipped, not refilled)
max_sample_rounds = 3  # our choice: at most 3 x 512 prompts drawn per step
steps = 150  # our choice: DLER reruns its job until it stops improving; validate and pick a checkpoint
save_every = 10  # our choice (DLER saves and validates every 5 steps)
keep_last = 0  # every checkpoint is a candidate; each is ~21 GB (fp32 weights 7.1 GB + optimizer.pt 14.2 GB)
micro_batch_size = 4
activation_checkpointing = True
rollout_batch = 256  # KV-cache slots per generate call: 1024 rows per rank at 8 GPUs go in 4 waves
sample_every = 10
seed = 42
