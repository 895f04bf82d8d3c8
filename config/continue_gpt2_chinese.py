# CMed-GPT's own recipe: continue pretraining GPT2-Chinese on the medical text (Qu et al.).
#   python convert.py --hf_dir=gpt2-distil-chinese-cluecorpussmall --out_dir=out/gpt2_chinese
#   python -m prepare.pretrain --tokenizer=gpt2-distil-chinese-cluecorpussmall/vocab.txt
#   torchrun --standalone --nproc_per_node=4 train.py config/continue_gpt2_chinese.py
# The architecture (layers, width, block 1024, biases, tanh GELU) is the imported checkpoint's; the optimiser
# and schedule start fresh. The data must be tokenized with the model's own vocab.txt (the line above).
import torch

init_from = 'out/gpt2_chinese'  # the folder convert.py wrote (best.pt)
out_dir = 'out/cmed_gpt'
dataset = 'pretrain'

block_size = 512  # the paper's length; the model's positions go to 1024
dropout = 0.0

# 16 sequences x 512 tokens x 8 micro-steps = 65,536 tokens per iteration
batch_size = 16
gradient_accumulation_steps = 8

# AdamW (0.9, 0.95), weight decay 0.1, clip 0.5; linear warm-up then cosine 1e-4 -> 5e-6. The paper warms up
# for 2,000 steps on its full corpus; data/pretrain (2.2M BERT tokens, 33 iterations an epoch) needs fewer.
learning_rate = 1e-4
min_lr = 5e-6
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 0.5
warmup_iters = 100
max_iters = 1000
lr_decay_iters = 1000  # = max_iters: the cosine ends where training ends

eval_interval = 100
eval_iters = 50
log_interval = 10

dtype = 'float16' if torch.cuda.is_available() else 'float32'  # the paper's mixed precision
