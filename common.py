"""
What several scripts share, in one small module (no script imports another script):
device and precision, autocast, the learning-rate schedule, one optimiser step, the peak FLOP/s
that MFU divides by, data folders and their meta.json, characters per token (for bits per
character), random training windows from the memmapped token files, the decoding options' ranges, and a
generated reply's end.
"""

import contextlib
import json
import math
import os
import time

import numpy as np
import torch

# dense bf16/fp16 tensor-core peaks from the datasheets (no sparsity); other GPUs are measured
GPU_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}
# what builds each data set the scripts read: named in the error when data/<name>/ is missing
PREPARE_COMMANDS = {
    'pretrain': 'python -m prepare.pretrain',
    'covid': 'python -m prepare.covid',
    'dxy': 'python -m prepare.dxy',
    'department': 'python -m prepare.department',
    'imcs': 'python -m prepare.imcs',
    'general': 'make data/general/meta.json',
    'medical_equal': 'make data/medical_equal/meta.json',
    'imcs_lexicon': 'python -m prepare.imcs --lexicon_entities --out data/imcs_lexicon',
}


# ----------------------------------------------------------------------------- device and precision


def device_type(device):
    """'cuda' or 'cpu': what torch.autocast and the GradScaler want."""
    return 'cuda' if device.startswith('cuda') else 'cpu'


def check_device(device):
    try:
        torch.device(device)
    except RuntimeError:
        raise SystemExit(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU: use --device=cpu")


def resolve_device_and_dtype(device, dtype):
    """(device, dtype, why): 'auto' resolved, with the reason for the dtype chosen (printed at start)."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    check_device(device)
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise SystemExit(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if dtype == 'float16' and not device.startswith('cuda'):  # auto never picks it on a CPU
        return device, dtype, "asked for; float16 on a CPU runs the GPU's gradient-scaler path, for testing it"
    if dtype != 'auto':
        return device, dtype, 'asked for'
    if device.startswith('cuda'):
        if torch.cuda.is_bf16_supported():
            return device, 'bfloat16', 'auto: this GPU has bf16'
        return device, 'float16', 'auto: this GPU has no bf16 (float16 with a gradient scaler)'
    # A CPU without native bf16 matmuls emulates them, many times slower than float32; with AMX (Intel
    # Sapphire Rapids and later) bf16 matmuls run on the tile unit and beat float32.
    if torch.cpu._is_amx_tile_supported():
        return device, 'bfloat16', 'auto: this CPU has AMX (native bf16 matmuls)'
    return device, 'float32', 'auto: this CPU has no AMX, and emulated bf16 is slower than float32'


def autocast_context(device, dtype):
    """Mixed precision for bf16/fp16 (weights stay float32); nothing for float32."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=getattr(torch, dtype))


def peak_flops(device, dtype):
    """(FLOP/s, how it was found): the number MFU is a fraction of. A known GPU's datasheet dense
    bf16 figure, else the best of several large square matmuls in the run's dtype, measured here
    as a benchmark would: a small or single matmul understates the peak and so inflates MFU."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for model_name, flops in GPU_PEAK_FLOPS.items():
            if model_name in name:
                return flops, f"{model_name} datasheet, dense bf16"
    n = 4096 if device.startswith('cuda') else 2048
    flops = measure_matmul_flops(device, getattr(torch, dtype), n)
    return flops, f"measured: best of 5 {n}x{n} {dtype} matmuls"


def busy_note(device, seconds=0.3):
    """'' when the CPU cores this run may use are mostly idle; else a note for the start-up line (other work
    lowers the measured peak). It looks at the cores' busy time over a moment (Linux's /proc/stat): a load
    average trails by minutes, and so calls a machine busy for a minute after its last job ended."""
    if device.startswith('cuda') or not os.path.exists('/proc/stat'):
        return ''
    cores = os.sched_getaffinity(0)
    total_before, idle_before = cpu_ticks(cores)
    time.sleep(seconds)
    total_after, idle_after = cpu_ticks(cores)
    busy = 1 - (idle_after - idle_before) / max(total_after - total_before, 1)
    if busy <= 0.5:
        return ''
    return (
        f"; the machine looked busy ({busy:.0%} of {len(cores)} cores in use): the peak is measured again at "
        "every evaluation"
    )


def cpu_ticks(cores):
    """(all, idle) clock ticks these cores have counted since boot, from /proc/stat."""
    total = idle = 0
    with open('/proc/stat') as f:
        for line in f:
            name, *ticks = line.split()
            if name.startswith('cpu') and name[3:].isdigit() and int(name[3:]) in cores:
                ticks = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                idle += ticks[3] + ticks[4]
    return total, idle


def measure_matmul_flops(device, dtype, n, tries=5):
    """The best FLOP/s of `tries` timed n x n matmuls after a warm-up (the best burst is the one least
    slowed by anything else running on the machine)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: the first call allocates and picks a kernel
    best = 0.0
    for _ in range(tries):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def synchronize(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)


# decoding options beside max_new_tokens: (allowed, as said in an error) for each; model.generate reads them
DECODING_RULES = {
    'temperature': (lambda v: math.isfinite(v) and v >= 0, 'a number >= 0 (0 = greedy)'),
    'top_k': (lambda v: v >= 0, '>= 0 (0 = off)'),
    'top_p': (lambda v: 0 < v <= 1, 'in (0, 1] (1 = off)'),
    'repetition_penalty': (lambda v: math.isfinite(v) and v > 0, 'a number > 0 (1 = off)'),
    'no_repeat_ngram_size': (lambda v: v >= 0, '>= 0 (0 = off)'),
}


def check_decoding(cfg):
    """Refuse a decoding option of cfg out of range, before anything loads (a negative temperature would sample the
    least likely tokens; top_p = 0 keeps no token at all)."""
    for key, (allowed, said) in DECODING_RULES.items():
        if not allowed(getattr(cfg, key)):
            raise SystemExit(f"--{key} must be {said}, not {getattr(cfg, key)}")


def until_stop(ids, stop_ids):
    """A row of model.generate's new ids up to and with the first of stop_ids (in a batch, a row that has
    stopped repeats its stop id until every row has)."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids) - 1)  # stops at the first, or keeps all
    return ids[: end + 1]


# ----------------------------------------------------------------------------- schedule and step


def learning_rate_at(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, schedule='cosine', warmdown_fraction=0.2):
    """Linear warm-up to learning_rate, then down to min_lr at lr_decay_iters (held there after).

    'cosine' (nanoGPT's and the papers'): a cosine from the end of warm-up. 'wsd' (warm-up, stable, decay):
    held at learning_rate, then a straight line down over the last warmdown_fraction of the iterations after
    warm-up. A run whose length is fixed late (a time budget) decays only at its end, and learns at the full
    rate until then, where the cosine has already lowered it."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    if schedule == 'wsd':
        decay = max(0.0, (progress - (1 - warmdown_fraction)) / warmdown_fraction) if warmdown_fraction else 0.0
        return learning_rate - decay * (learning_rate - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def optimizer_step(optimizer, scaler, parameters, grad_clip, learning_rate):
    """Clip, step and zero the gradients; returns True when fp16 overflowed and the step was skipped."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    for group in optimizer.param_groups:  # optim.py: a group's peak is lr_scale times learning_rate's
        group['lr'] = learning_rate * group.get('lr_scale', 1.0)
    scale_before = scaler.get_scale()
    scaler.step(optimizer)  # with fp16, skips the step when a gradient is inf/nan
    scaler.update()  # ... and then lowers the scale: that is how we see the skip
    optimizer.zero_grad(set_to_none=True)
    return scaler.get_scale() < scale_before


# ----------------------------------------------------------------------------- data folders


def data_dir_of(dataset):
    """data/<dataset>/, or the path itself when it is absolute; a clear error naming the command
    that builds it when it has not been prepared."""
    data_dir = dataset if os.path.isabs(dataset) else os.path.join('data', dataset)
    if not os.path.isfile(os.path.join(data_dir, 'meta.json')):
        command = PREPARE_COMMANDS.get(os.path.basename(os.path.normpath(dataset)))
        how = (
            f"`{command}`"
            if command
            else f"prepare/: `python -m prepare.pretrain --corpus YOUR_TEXTS --out {data_dir}` (a pretraining set) or "
            f"`python -m prepare.dialogues --corpus YOUR_DIALOGUES --out {data_dir}` (an example set)"
        )
        raise SystemExit(f"no prepared data set in {data_dir}/ (meta.json missing): build it with {how}")
    return data_dir


def load_meta(data_dir):
    with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
        return json.load(f)


def tag_table_size(tag_map):
    return max(tag_map.values()) + 1  # ids run 0..max, 0 = other / no entity


def new_model_args(cfg, meta):
    """GPTConfig fields for a fresh model: sizes from the config, vocabulary and tag sets from meta.json."""
    return dict(
        block_size=cfg.block_size,
        vocab_size=meta['vocab_size'],
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        bias=cfg.bias,
        n_lexical=tag_table_size(meta['lexical_map']) if cfg.lexical else 0,
        n_entity=tag_table_size(meta['entity_map']) if cfg.entity else 0,
        attention=cfg.attention,
    )


def load_char_counts(data_dir):
    """Characters each token id decodes to (for bits per character); None if there is no tokenizer."""
    path = os.path.join(data_dir, 'tokenizer.model')
    if not os.path.exists(path):
        return None
    from tokenizer import Tokenizer  # here, not at the top: training itself needs no tokenizer

    return Tokenizer.load(path).char_counts()


def check_token_files(data_dir, block_size):
    """The token files exist, hold whole uint16 ids, and have room for one window; returns train tokens."""
    n_tokens = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if not size or size % 2:
            problem = 'is missing' if size is None else 'is empty' if size == 0 else 'has an odd number of bytes'
            raise SystemExit(f"{path} {problem}: it must hold uint16 token ids; rebuild the data set (prepare/)")
        n_tokens[split] = size // 2
        if n_tokens[split] <= block_size:
            raise SystemExit(
                f"{path} has {n_tokens[split]:,} tokens, fewer than one window of block_size+1 = "
                f"{block_size + 1:,}: lower --block_size or add data"
            )
    return n_tokens['train']


def check_attention_memory(block_size, batch_size, n_layer, n_head, device):
    """Refuse a block_size whose attention alone cannot fit, before building anything: each layer keeps a
    (block_size, block_size) causal mask, and a step holds (batch, heads, T, T) scores per layer."""
    T = block_size
    needed = n_layer * T * T + n_layer * batch_size * n_head * T * T * 4 * 2  # mask bytes + scores, fwd and bwd
    available = (
        torch.cuda.mem_get_info(device)[1]
        if device.startswith('cuda')
        else os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    )
    if needed > available:
        raise SystemExit(
            f"block_size={T:,} needs about {needed / 2**30:,.1f} GiB for attention alone ({n_layer} layers "
            f"x batch {batch_size} x {n_head} heads x {T:,}^2), more than the {available / 2**30:,.1f} "
            f"GiB here: lower --block_size (the paper uses 512) or --batch_size"
        )


TAG_FILES = {'lexical': 'lex', 'entity': 'ent'}  # model input -> {split}.<suffix>.bin


class Windows:
    """Random windows of block_size + 1 tokens (and their tags) from the memmapped bins of a data dir."""

    def __init__(self, data_dir, block_size, batch_size, tag_inputs, device):
        self.data_dir, self.block_size, self.batch_size = data_dir, block_size, batch_size
        self.tag_inputs, self.device = tag_inputs, device  # tag_inputs: e.g. ('lexical', 'entity')
        for split in ('train', 'val'):
            n_tokens = len(self.memmap(split, 'bin', np.uint16))
            if n_tokens <= block_size:
                raise SystemExit(f"{data_dir}/{split}.bin has {n_tokens} tokens, fewer than block_size+1")

    def memmap(self, split, suffix, dtype):
        # opened anew for every batch: a long-lived memmap keeps each page it touched counted as resident
        return np.memmap(os.path.join(self.data_dir, f"{split}.{suffix}"), dtype=dtype, mode='r')

    def batch(self, split, rng):
        """Model inputs for batch_size windows whose start positions are drawn from rng."""
        tokens = self.memmap(split, 'bin', np.uint16)
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        windows = self.read(tokens, starts)  # (B, T+1)
        inputs = {'idx': windows[:, :-1], 'targets': windows[:, 1:]}
        for name in self.tag_inputs:  # a token's tags go in with the token
            inputs[name] = self.read(self.memmap(split, f"{TAG_FILES[name]}.bin", np.uint8), starts)[:, :-1]
        return {name: self.to_device(tensor) for name, tensor in inputs.items()}

    def read(self, data, starts):
        rows = np.stack([data[start : start + self.block_size + 1] for start in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def to_device(self, tensor):
        if self.device.startswith('cuda'):  # pinned memory lets the copy overlap with compute
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)
