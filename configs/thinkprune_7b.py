# The paper's schedule (configs/thinkprune.py: 4000 -> 3000 -> 2000, the same selection rule) applied to
# DeepSeek-R1-Distill-Qwen-7B on 8 x 80 GB GPUs.   torchrun --nproc_per_node 8 schedule.py configs/thinkprune_7b.py
# Every value not set here is configs/thinkprune.py's. Check the fit first:
#   python bench/plan.py configs/thinkprune_7b.py --gpus 8 --gpu_mem_gb 80 --shape 7B
exec(open(__file__.replace("thinkprune_7b.py", "thinkprune.py")).read())
# huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --local-dir models/DeepSeek-R1-Distill-Qwen-7B
model = "models/DeepSeek-R1-Distill-Qwen-7B"
out_dir = "runs/thinkprune_7b"
# Each checkpoint holds fp32 weights (model.safetensors, 30.5 GB) and optimizer.pt (AdamW's two fp32 states,
# 60.9 GB): ~91 GB a checkpoint. Every one is kept as a candidate for selection: at save_every=20 that is
# 6 + 5 + 5 checkpoints over the three stages, ~1.5 TB.
train = dict(
    train,
    # KV-cache slots per rank: a 7B token is 56 KiB of cache in bf16 (28 layers x 4 kv heads x 128 x k,v x 2
    # bytes), so 128 slots x 4768 positions are 35 GB; 256 slots (70 GB) do not fit beside the 15.2 GB of
    # gathered bf16 weights. The plan's largest is 138; 128 halves the rank's 256 rows exactly.
    rollout_batch=128,
)
eval_batch = 16  # KV-cache slots in validation: at 32k tokens a 7B row is ~1.9 GB in bf16
