# A small GPT that learns in about ten minutes on 2 CPU cores:  python train.py config/tiny.py
# ~3.3M parameters (half of them the 8,000 x 192 token table); 1,600 steps of 2,048 tokens are about 2.9 passes
# over data/pretrain's 1.13M training tokens. The recipe is the one experiments/time_to_quality.py measured
# fastest to a given val bits/char (docs/training.md#time-to-quality): Muon for the blocks' matrices.
out_dir = 'out/tiny'
dataset = 'pretrain'

n_layer = 4
n_head = 4
n_embd = 192
block_size = 128
dropout = 0.0  # about three passes: too few to overfit

batch_size = 16
gradient_accumulation_steps = 1

# Muon (optim.py) for the blocks' 2-D matrices at muon_lr; AdamW at learning_rate for the tables, gains and the
# tied head, with nanoGPT's small-model betas. Both follow the same warm-up and cosine. The rates are twice
# optim.py's defaults: at 1,600 steps that gave val bits/char 3.339 instead of 3.383 (docs/training.md).
optimizer = 'muon'
muon_lr = 0.04
learning_rate = 6e-3
min_lr = 6e-4
beta2 = 0.99
weight_decay = 0.1
warmup_iters = 100
max_iters = 1600
lr_decay_iters = 1600
grad_clip = 1.0

eval_interval = 100
eval_iters = 20
log_interval = 50
