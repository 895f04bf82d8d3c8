"""
Saving and loading checkpoints, shared by every script.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
torch.load(weights_only=True), which never unpickles arbitrary objects: a downloaded checkpoint
cannot run code. train.py writes these keys:
    model          the raw model's state_dict (no DDP or torch.compile prefixes)
    model_args     the GPTConfig fields: GPT(GPTConfig(**ckpt['model_args'])) rebuilds the model
    config         the resolved run config
    optimizer      the optimizer's state_dict
    scaler         the fp16 gradient scaler's state_dict ({} when unused)
    iter_num       the iteration the run continues from
    best_val_loss  the best validation loss so far
"""
import os

import torch

MODEL_KEYS = ('model', 'model_args')


def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous file intact, never a half-written one."""
    temp_path = f"{path}.tmp"  # same directory, so os.replace is a rename within one file system
    try:
        with open(temp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def load_checkpoint(path, device='cpu', required_keys=MODEL_KEYS):
    """Load a checkpoint dict onto `device`; a clear error if it is missing, not one, or incomplete."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        reason = str(error).split('\n')[0]  # torch's weights_only errors run to many lines
        raise ValueError(f"{path} is not a checkpoint that loads with weights_only=True "
                         f"({type(error).__name__}: {reason})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return checkpoint
