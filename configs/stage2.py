# ThinkPrune stage 2: the same recipe under a 3000-token limit, from stage 1's selected checkpoint.
#   torchrun --nproc_per_node=8 train.py configs/stage2.py --model=runs/stage1/step_000120
exec(open(__file__.replace("stage2.py", "stage1.py")).read())  # every other value is stage 1's
model = "runs/stage1/step_000120"  # replace with the checkpoint validation selected; schedule.py sets it
out_dir = "runs/stage2"
limit = 3000
steps = 100  # our choice, as in stage 1
