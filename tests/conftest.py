"""Test-wide settings."""

import os
from pathlib import Path

import pytest
import torch

# The tests' tensors are tiny: a second thread buys nothing, and when the cores are shared (CI
# neighbours, torchrun's two ranks) spinning threads slow the suite down many times over.
torch.set_num_threads(1)


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process may not create anything in, as a read-only disk is: permission bits for a user; for
    root, who writes through them, the kernel's /proc/sys, which takes no new entry even from root."""
    if os.geteuid() != 0:
        locked = tmp_path / 'locked'
        locked.mkdir()
        locked.chmod(0o555)  # read and enter, not write
        yield locked
        locked.chmod(0o755)  # so that pytest can remove it
        return
    locked = Path('/proc/sys')
    if not locked.is_dir() or os.access(locked, os.W_OK):
        pytest.skip('running as root, with no folder here that root may not write in')
    yield locked
