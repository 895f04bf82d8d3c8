# A small GPT that learns visibly in about five minutes on 2 CPU cores:  python train.py config/tiny.py
# ~3.3M parameters (half of them the 8,000 x 192 token table); 1,000 steps of 2,048 tokens
# are about 1.7 passes over data/pretrain's 1.2M training tokens.
out_dir = 'out/tiny'
dataset = 'pretrain'

n_layer = 4
n_head = 4
n_embd = 192
block_size = 128
dropout = 0.0  # too few steps to overfit

batch_size = 16
gradient_accumulation_steps = 1

# a small model takes a much larger step than the paper's 1e-4, and needs only a short warm-up
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
max_iters = 1000
lr_decay_iters = 1000
grad_clip = 1.0

eval_interval = 200
eval_iters = 20
log_interval = 50
