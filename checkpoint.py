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
    iter_num       the iteration the run continues from; it is also the data position and the random
                   state, since train.py draws each iteration's windows and dropout masks from
                   (seed, rank, iter_num) alone
    best_val_loss  the best validation loss so far
    tokenizer      {'sha256', 'data'}: the bytes of the tokenizer.model the run trained with, so that
                   sample.py, finetune.py and eval.py never pair the weights with another vocabulary

A run holds its out_dir exclusively (claim_out_dir): two runs can never write into one folder.
"""

import fcntl
import glob
import hashlib
import os
import pickle
import sys
import tempfile
import time
import warnings

import torch

MODEL_KEYS = ('model', 'model_args')


def save_checkpoint(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous file intact, never a half-written one."""
    # a unique name in the same directory (os.replace is then a rename within one file system)
    fd, temp_path = tempfile.mkstemp(
        dir=os.path.dirname(path) or '.', prefix=f".{os.path.basename(path)}.", suffix='.tmp'
    )
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def claim_out_dir(out_dir):
    """Hold out_dir for the rest of this process: an exclusive lock on out_dir/.lock, which the system
    releases when the process ends in any way (so a killed run never leaves it stuck). Returns the open
    lock file: keep it referenced. Temporaries of a write that was killed are removed."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, '.lock'), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SystemExit(
            f"{out_dir} is in use by another run ({lock.read().strip() or 'pid unknown'}): wait for "
            f"it to finish or give another --out_dir"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}")
    lock.flush()
    for stale in glob.glob(os.path.join(out_dir, '.*.tmp')):  # save_checkpoint's, from a killed write
        os.remove(stale)
    return lock


def refuse_previous_run(out_dir, overwrite, resumable=True):
    """A new run (not resumed) never replaces a previous run's files in out_dir unless --overwrite."""
    previous = [
        name
        for name in ('ckpt.pt', 'best.pt', 'log.jsonl')
        if os.path.isfile(os.path.join(out_dir, name)) and os.path.getsize(os.path.join(out_dir, name))
    ]
    if previous and not overwrite:
        resume = 'continue it with --init_from=resume, ' if resumable else ''
        raise SystemExit(
            f"{out_dir} holds a previous run ({', '.join(previous)}): {resume}use another --out_dir, "
            f"or pass --overwrite to replace it"
        )


def start_fresh(out_dir, overwrite, resumable=True):
    """Clear out_dir for a new run (held, and checked by refuse_previous_run): no old checkpoint, a new log."""
    refuse_previous_run(out_dir, overwrite, resumable)  # again: out_dir may have changed before we held it
    for name in ('ckpt.pt', 'best.pt'):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    open(os.path.join(out_dir, 'log.jsonl'), 'w').close()


def load_weights_only(path, device='cpu'):
    """torch.load(weights_only=True): plain tensors and data only, never code. torch warns about an odd pickle
    header before it refuses such a file; the caller's error is the one message the user sees."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.load(path, map_location=device, weights_only=True)


def load_checkpoint(path, device='cpu', required_keys=MODEL_KEYS):
    """Load a checkpoint dict onto `device`; a clear error if it is missing, not one, or incomplete."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = load_weights_only(path, device)
    except Exception as error:
        if is_cut_off(path, error):
            raise ValueError(
                f"{path} is truncated or damaged ({type(error).__name__}: "
                f"{str(error).split('.')[0] or 'no data'}): {fall_back(path)}"
            ) from None
        # torch's message advises loading with weights_only=False: never pass that on, it would run
        # whatever code the file holds; keep only what it says is wrong
        detail = [line.strip() for line in str(error).split('\n') if line.strip()]
        reason = next(
            (line for line in detail if line.startswith(('Unsupported', 'Trying to load'))), type(error).__name__
        )
        raise ValueError(
            f"{path} is not a checkpoint this project wrote: it does not load as plain tensors and "
            f"data ({reason}); if it is a Hugging Face model folder's file, import it with convert.py"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    require_keys(checkpoint, required_keys, path)
    return checkpoint


def is_cut_off(path, error):
    """Whether a file that failed to load is empty, or torch.save's zip archive that does not read (a copy or
    download cut short, a damaged disk), rather than a file of another kind."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'' or (head == b'PK\x03\x04' and not isinstance(error, pickle.UnpicklingError))


def fall_back(path):
    """What to use instead of a damaged checkpoint: the run's other one, where there is one."""
    folder, name = os.path.split(path)
    other = {'ckpt.pt': 'best.pt', 'best.pt': 'ckpt.pt'}.get(name)
    if other and os.path.isfile(os.path.join(folder, other)):
        which = 'lowest validation loss' if other == 'best.pt' else 'last evaluation'
        return f"fall back to {os.path.join(folder, other)} (the same run's checkpoint at its {which})"
    return "restore it from a copy"


def require_keys(checkpoint, keys, path):
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")


# ----------------------------------------------------------------------------- p-tuning files


def fingerprint(state_dict):
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes): names the base a prompt was tuned on,
    whichever file those weights were saved in."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapted(path, model, model_args, config, base_path, base_state, tokenizer):
    """A p-tuned result: only the tensors that trained, the fingerprint of the base they belong to, and
    the tokenizer record (see tokenizer_record) of the text they were tuned on."""
    trained = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(
        dict(
            trained=trained,
            model_args=model_args,
            config=config,
            base_checkpoint=base_path,
            base_fingerprint=fingerprint(base_state),
            tokenizer=tokenizer,
        ),
        path,
    )


def load_model(path, device='cpu', base_path=None):
    """The model in a checkpoint or p-tuning file, or in a run directory (prompt.pt, else best.pt, else
    ckpt.pt). A p-tuning file loads its base (the path it recorded, or base_path) and refuses any other.
    Returns (model, the file's checkpoint dict)."""
    from model import GPT, GPTConfig  # here, not at the top: train.py's DDP tests import this file alone

    if os.path.isdir(path):
        names = [n for n in ('prompt.pt', 'best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"no prompt.pt, best.pt or ckpt.pt in {path}: train or fine-tune into it first")
        path = os.path.join(path, names[0])
    checkpoint = load_checkpoint(path, device, required_keys=())
    if 'trained' not in checkpoint:  # a whole model
        require_keys(checkpoint, MODEL_KEYS, path)
        model = GPT(GPTConfig(**checkpoint['model_args']))
        model.load_state_dict(checkpoint['model'])
        return model.to(device), checkpoint
    adapted = checkpoint
    require_keys(adapted, ('model_args', 'base_checkpoint', 'base_fingerprint'), path)
    base_path, expected = base_path or adapted['base_checkpoint'], adapted['base_fingerprint']
    if not os.path.isfile(base_path):
        raise FileNotFoundError(
            f"{path} was p-tuned on the base {base_path}, which is not there: give "
            f"--base=<that checkpoint> (weights fingerprint {expected})"
        )
    base = load_checkpoint(base_path, device)
    if fingerprint(base['model']) != expected:
        raise ValueError(
            f"{path} was p-tuned on a different base model than {base_path}: give "
            f"--base=<the checkpoint it was tuned on> (weights fingerprint {expected})"
        )
    model = GPT(GPTConfig(**adapted['model_args']))
    missing, unexpected = model.load_state_dict({**base['model'], **adapted['trained']}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} and its base do not make a whole model: missing {missing}, unexpected {unexpected}")
    return model.to(device), adapted


# ----------------------------------------------------------------------------- the tokenizer a run carries


def tokenizer_record(path):
    """What a checkpoint keeps of its tokenizer: the bytes of tokenizer.model and their SHA-256."""
    with open(path, 'rb') as f:
        data = f.read()
    return dict(sha256=hashlib.sha256(data).hexdigest(), data=data)


def check_tokenizer(record, data_dir, what):
    """Refuse a data folder whose tokenizer is not the one `what` was trained with, naming both."""
    path = os.path.join(data_dir, 'tokenizer.model')
    have = tokenizer_record(path)['sha256']
    if have != record['sha256']:
        raise SystemExit(
            f"{what} was trained with tokenizer sha256 {record['sha256'][:12]}, but {path} is "
            f"{have[:12]}: use the data folder it was trained on, or rebuild this one with that "
            f"tokenizer (python -m prepare.<set> --tokenizer_model=...)"
        )
