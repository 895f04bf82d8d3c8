# CMed-GPT large (Qu et al.): the base recipe with 12 layers instead of 6.
#   torchrun --standalone --nproc_per_node=4 train.py config/large.py
from config.base import *  # noqa: F401,F403  (every base setting; config/ is found from the repo root)

out_dir = 'out/large'
n_layer = 12
