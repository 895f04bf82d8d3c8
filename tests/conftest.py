"""Test-wide settings."""

import torch

# The tests' tensors are tiny: a second thread buys nothing, and when the cores are shared (CI
# neighbours, torchrun's two ranks) spinning threads slow the suite down many times over.
torch.set_num_threads(1)
