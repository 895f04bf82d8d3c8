# CMed-GPT base (Qu et al.): 6 layers, 12 heads, 768 wide, context 512; the paper's optimiser and
# schedule. For GPUs:  torchrun --standalone --nproc_per_node=4 train.py config/base.py
import torch

out_dir = 'out/base'
dataset = 'pretrain'

n_layer = 6
n_head = 12
n_embd = 768
block_size = 512
dropout = 0.0

# 16 sequences x 512 tokens x 8 micro-steps = 65,536 tokens per iteration, however many GPUs share them
batch_size = 16
gradient_accumulation_steps = 8

# AdamW (0.9, 0.95), weight decay 0.1, clip 0.5; warm-up 2,000 steps then cosine 1e-4 -> 5e-6
learning_rate = 1e-4
min_lr = 5e-6
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 0.5
warmup_iters = 2000
# The faster recipe is one key away: --optimizer=muon (Muon at muon_lr 0.02 for the blocks' matrices, AdamW as
# above for the rest). On config/tiny.py's model (with AdamW at 3e-3 there) it reached the AdamW reference's final
# val bits/char 2.11x sooner in a 300 s run on 2 CPU cores (docs/training.md#the-levers-one-at-a-time); at this
# width, not measured.
# 20,000 x 65,536 = 1.3B tokens: sized for a corpus of at least ~330M tokens (at most 4 passes; the paper's seven
# dialogue corpora plus 655.8 MB of books). On data/pretrain (1.2M tokens) it would be ~1,100 passes: train.py warns;
# build a bigger set with python -m prepare.pretrain --corpus, or lower max_iters.
max_iters = 20000
lr_decay_iters = 20000  # = max_iters: the cosine ends where training ends

eval_interval = 500
eval_iters = 100
log_interval = 10

# the paper trained in float16 mixed precision (train.py adds the gradient scaler); a CPU has no fast fp16
dtype = 'float16' if torch.cuda.is_available() else 'float32'
