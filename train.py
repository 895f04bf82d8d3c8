"""
Pretraining a GPT on Chinese medical text.

On a laptop:           python train.py config/tiny.py
On 4 GPUs (DDP):       torchrun --standalone --nproc_per_node=4 train.py config/base.py
Override any key:      python train.py config/tiny.py --max_iters=500 --compile
Continue a run:        python train.py config/tiny.py --init_from=resume

Writes out_dir/ckpt.pt (last), out_dir/best.pt (lowest val loss) and out_dir/log.jsonl (one JSON
object per log or eval line).
"""
import contextlib
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint
from configurator import configure
from model import GPT, GPTConfig

# Defaults are the paper's base model (CMed-GPT); config/*.py and --key=value override them.
DEFAULTS = dict(
    # output and evaluation
    out_dir='out',
    init_from='scratch',           # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_interval=1000,            # evaluate (and checkpoint) every this many iterations
    eval_iters=50,                 # batches per split per evaluation
    log_interval=10,
    always_save_checkpoint=True,   # write ckpt.pt at every eval, not only when val loss improves
    # data
    dataset='pretrain',            # reads data/<dataset>/ (an absolute path is used as it is)
    batch_size=16,                 # sequences per micro-step per rank
    block_size=512,
    gradient_accumulation_steps=8,  # micro-steps per iteration summed over all ranks (as nanoGPT)
    # model
    n_layer=6,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=False,
    lexical=False,                 # add a part-of-speech embedding (its size comes from meta.json)
    entity=False,                  # add an entity embedding (its size comes from meta.json)
    attention='fused',             # 'manual' (hand-written) or 'fused' (scaled_dot_product_attention)
    # AdamW
    learning_rate=1e-4,            # peak, reached after warm-up
    max_iters=100000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=0.5,                 # clip the global gradient norm to this; 0 = off
    # schedule: linear warm-up, then cosine down to min_lr at lr_decay_iters, then held at min_lr
    warmup_iters=2000,
    lr_decay_iters=100000,
    min_lr=5e-6,
    # system
    device='auto',                 # 'auto' = cuda when there is one, else cpu; or 'cpu', 'cuda:1'...
    dtype='auto',                  # 'auto' = float32 on CPU, bfloat16 on CUDA (float16 where no bf16)
    compile=False,                 # torch.compile the model
    seed=1337,
    peak_flops=0.0,                # the device's peak FLOP/s for MFU; 0 = look it up or measure it
)
TRAIN_STREAM, EVAL_STREAM = 0, 1   # keep training and evaluation random numbers apart
TAG_FILES = {'lexical': 'lex', 'entity': 'ent'}  # model input -> {split}.<suffix>.bin
GPU_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense bf16/fp16 tensor cores


# ----------------------------------------------------------------------------- setup

def setup_distributed(device):
    """Under torchrun join the process group; returns (rank, world_size, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, device
    on_gpu = device.startswith('cuda')
    dist.init_process_group(backend='nccl' if on_gpu else 'gloo')
    if on_gpu:  # one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def resolve_device_and_dtype(device, dtype):
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    check_device(device)
    if dtype == 'auto':
        # float32 on CPU: without AMX a CPU's bf16 matmuls run ~30x slower than float32
        # (with AMX, as on Sapphire Rapids, --dtype=bfloat16 is faster: measure before switching)
        if not device.startswith('cuda'):
            dtype = 'float32'
        else:
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return device, dtype


def check_device(device):
    try:
        torch.device(device)
    except RuntimeError:
        raise SystemExit(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU: use --device=cpu")


def autocast_context(device_type, dtype):
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def load_char_counts(data_dir):
    """Characters each token id decodes to (for bits per character); None if there is no tokenizer."""
    path = os.path.join(data_dir, 'tokenizer.model')
    if not os.path.exists(path):
        return None
    from prepare.tokenizer import Tokenizer  # here, not at the top: training itself needs no tokenizer
    return Tokenizer.load(path).char_counts()


def new_model_args(cfg, meta):
    """GPTConfig fields for a fresh model: sizes from the config, vocabulary and tag sets from meta.json."""
    def table_size(tag_map):  # ids run 0..max (0 = other/none)
        return max(tag_map.values()) + 1
    return dict(block_size=cfg.block_size, vocab_size=meta['vocab_size'], n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                n_lexical=table_size(meta['lexical_map']) if cfg.lexical else 0,
                n_entity=table_size(meta['entity_map']) if cfg.entity else 0,
                attention=cfg.attention)


def peak_flops_of(device, dtype):
    """The peak FLOP/s that MFU is measured against: a known GPU's datasheet figure, else measured."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for model_name, flops in GPU_PEAK_FLOPS.items():
            if model_name in name:
                return flops
    return measure_matmul_flops(device, getattr(torch, dtype))


def measure_matmul_flops(device, dtype, seconds=0.2):
    """FLOP/s of a square matmul in a short loop: a practical peak for devices without a datasheet."""
    n = 4096 if device.startswith('cuda') else 512  # big enough to keep the device busy, quick on a CPU
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # warm-up: the first call allocates
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
        if device.startswith('cuda'):
            torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- data

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
        windows = self.read(tokens, starts)          # (B, T+1)
        inputs = {'idx': windows[:, :-1], 'targets': windows[:, 1:]}
        for name in self.tag_inputs:                 # a token's tags go in with the token
            inputs[name] = self.read(self.memmap(split, f"{TAG_FILES[name]}.bin", np.uint8), starts)[:, :-1]
        return {name: self.to_device(tensor) for name, tensor in inputs.items()}

    def read(self, data, starts):
        rows = np.stack([data[start:start + self.block_size + 1] for start in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def to_device(self, tensor):
        if self.device.startswith('cuda'):  # pinned memory lets the copy overlap with compute
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


# ----------------------------------------------------------------------------- training

def learning_rate_at(it, cfg):
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def window_rng(run, stream, index):
    """Random numbers that depend on (seed, rank, stream, index) only: each rank reads its own windows."""
    return np.random.default_rng([run.cfg.seed, run.rank, stream, index])


def sum_over_ranks(values, world_size, device):
    """Element-wise sum of a list of numbers over all ranks (the list itself when single process)."""
    if world_size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def train_step(run, iter_num):
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns (this rank's mean loss as a tensor on the device, whether fp16 skipped the step). The loss
    stays on the device so that a GPU is not made to wait for it on every step."""
    # Windows and dropout masks are a function of (seed, rank, iteration) alone, so a resumed run
    # draws exactly what the uninterrupted one drew, with nothing but iter_num to restore.
    rng = window_rng(run, TRAIN_STREAM, iter_num)
    torch.manual_seed(int(rng.integers(2 ** 62)))
    loss_sum = torch.zeros((), device=run.device)
    for micro_step in range(run.accum_steps):
        batch = run.windows.batch('train', rng)
        is_last = micro_step == run.accum_steps - 1
        # DDP averages gradients over ranks on every backward; only the last micro-step needs it
        skip_sync = run.world_size > 1 and not is_last
        with run.train_model.no_sync() if skip_sync else contextlib.nullcontext():
            with run.autocast:
                _, loss = run.train_model(**batch)
            run.scaler.scale(loss / run.accum_steps).backward()
        loss_sum += loss.detach()
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    for group in run.optimizer.param_groups:
        group['lr'] = learning_rate_at(iter_num, run.cfg)
    scale_before = run.scaler.get_scale()
    run.scaler.step(run.optimizer)  # with fp16, skips the step when a gradient is inf/nan
    run.scaler.update()             # ... and then lowers the scale: that is how we see the skip
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / run.accum_steps, run.scaler.get_scale() < scale_before


def mean_loss_over_ranks(run, loss, iter_num):
    """The training loss averaged over ranks, as a number; stops the run if it is not finite."""
    loss = sum_over_ranks([loss.item()], run.world_size, run.device)[0] / run.world_size
    if not math.isfinite(loss) and not run.scaler.is_enabled():
        raise SystemExit(f"stopping: non-finite training loss ({loss}) at iter {iter_num} with dtype "
                         f"{run.dtype} (checked every log_interval={run.cfg.log_interval} iterations); "
                         f"no checkpoint was written after it. Lower learning_rate or check the data.")
    return loss


@torch.no_grad()
def evaluate(run):
    """Train/val loss on eval_iters fixed batches per split (over all ranks), val perplexity, bits/char."""
    run.eval_model.eval()
    train_nats, train_tokens, _ = split_totals(run, 'train')
    val_nats, val_tokens, val_chars = split_totals(run, 'val')
    run.eval_model.train()
    val_loss = val_nats / val_tokens
    return {'train_loss': train_nats / train_tokens, 'val_loss': val_loss,
            'val_ppl': math.exp(val_loss) if val_loss < 700 else math.inf,  # exp overflows past ~709
            'val_bpc': val_nats / math.log(2) / val_chars if val_chars else None}


def split_totals(run, split):
    """(nats, tokens, characters) summed over eval_iters batches of one split and over all ranks."""
    # the same windows at every evaluation, so successive losses differ only by the model
    rng = window_rng(run, EVAL_STREAM, ('train', 'val').index(split))
    nats = tokens = chars = 0.0
    for _ in range(run.cfg.eval_iters):
        batch = run.windows.batch(split, rng)
        with run.autocast:
            _, loss = run.eval_model(**batch)
        n = batch['targets'].numel()
        nats, tokens = nats + loss.item() * n, tokens + n
        if run.char_counts is not None:
            chars += run.char_counts[batch['targets']].sum().item()
    return sum_over_ranks([nats, tokens, chars], run.world_size, run.device)


def ranks_in_step_checksums(run):
    """Each rank's sum of squared weights: DDP must leave every rank with the same numbers."""
    checksum = sum(p.detach().double().square().sum() for p in run.model.parameters()).reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(run.world_size)]
    dist.all_gather(gathered, checksum)
    return [c.item() for c in gathered]


def leave_process_group():
    """Leave torchrun's process group and end this process, skipping the interpreter's teardown."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Gloo releases a finished collective on one of its worker threads, which may happen after our
    # wait() has returned. When Python owned the collective's tensors, that release takes the GIL, and
    # if the interpreter is tearing down by then, Python 3.11 ends the thread mid-destructor and the
    # process aborts ("terminate called without an active exception"; the gdb trace ends in
    # ~AsyncAllgatherWork, run from ProcessGroupGloo::runLoop). DDP keeps the process group alive, so
    # destroy_process_group() does not join those threads. Everything is written and flushed at this
    # point, so exit at once and leave no teardown for the threads to race.
    os._exit(0)


# ----------------------------------------------------------------------------- output

def log(run, record, text):
    """Print a line and append a JSON record to out_dir/log.jsonl (rank 0 only)."""
    if run.rank == 0:
        print(text, flush=True)
        with open(os.path.join(run.cfg.out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')


def checkpoint_of(run, iter_num, best_val_loss):
    return {'model': run.model.state_dict(), 'model_args': run.model_args, 'config': vars(run.cfg),
            'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
            'iter_num': iter_num, 'best_val_loss': best_val_loss}


def evaluate_and_save(run, iter_num, best_val_loss):
    """Evaluate, log, write ckpt.pt / best.pt (rank 0); returns the metrics and the new best val loss."""
    metrics = evaluate(run)
    log(run, {'iter': iter_num, **metrics},
        f"eval {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
        f"val ppl {metrics['val_ppl']:.2f}, val bits/char {bpc_text(metrics)}")
    val_loss = metrics['val_loss']
    if not math.isfinite(val_loss):
        raise SystemExit(f"stopping: non-finite val loss at iter {iter_num}; no checkpoint written.")
    improved = val_loss < best_val_loss
    best_val_loss = min(val_loss, best_val_loss)
    if run.rank == 0 and iter_num > 0:  # at iter 0 nothing has been learned yet
        checkpoint = checkpoint_of(run, iter_num, best_val_loss)
        if improved or run.cfg.always_save_checkpoint:
            save_checkpoint(checkpoint, os.path.join(run.cfg.out_dir, 'ckpt.pt'))
        if improved:
            save_checkpoint(checkpoint, os.path.join(run.cfg.out_dir, 'best.pt'))
    return metrics, best_val_loss


def bpc_text(metrics):
    return 'n/a (no tokenizer.model)' if metrics['val_bpc'] is None else f"{metrics['val_bpc']:.4f}"


def log_progress(run, iter_num, loss, skipped, dt, seconds_per_iter):
    tokens_per_s = run.tokens_per_iter / dt
    mfu = run.model.estimate_mfu(run.cfg.batch_size * run.accum_steps, dt, run.peak_flops)
    lr = learning_rate_at(iter_num, run.cfg)
    eta = seconds_per_iter * (run.cfg.max_iters - iter_num - 1)
    skip_note = f", fp16 overflow: step skipped, scale now {run.scaler.get_scale():g}" if skipped else ""
    log(run, {'iter': iter_num, 'loss': loss, 'lr': lr, 'tokens_per_s': tokens_per_s, 'mfu': mfu,
              'skipped_step': skipped},
        f"iter {iter_num}/{run.cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
        f"{tokens_per_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min{skip_note}")


# ----------------------------------------------------------------------------- main

def starting_point(cfg, data_dir, device):
    """(model_args, checkpoint): out_dir/ckpt.pt's when resuming, else new ones and None."""
    if cfg.init_from == 'scratch':
        with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
            return new_model_args(cfg, json.load(f)), None
    if cfg.init_from != 'resume':
        raise SystemExit(f"init_from must be 'scratch' or 'resume', not {cfg.init_from!r}")
    try:
        checkpoint = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), device,
                                     required_keys=('model', 'model_args', 'optimizer', 'scaler',
                                                    'iter_num', 'best_val_loss'))
    except (FileNotFoundError, ValueError) as error:  # a user's mistake, not a bug: no traceback
        raise SystemExit(f"cannot resume: {error}")
    return checkpoint['model_args'], checkpoint  # the architecture is the checkpoint's, whatever cfg says


def build_run(cfg):
    """Everything a training loop needs, in one namespace: model, optimizer, data, precision, ranks."""
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    rank, world_size, device = setup_distributed(device)
    if cfg.gradient_accumulation_steps % world_size:
        raise SystemExit(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
                         f"multiple of the number of processes ({world_size})")
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: float32 speed for free
    torch.backends.cudnn.allow_tf32 = True
    data_dir = os.path.join('data', cfg.dataset)
    model_args, checkpoint = starting_point(cfg, data_dir, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    if checkpoint is not None:
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['scaler']:  # {} from a run without fp16: the fresh scaler is right then
            scaler.load_state_dict(checkpoint['scaler'])
    eval_model = torch.compile(model) if cfg.compile else model
    train_model = eval_model
    if world_size > 1:
        train_model = DDP(eval_model, device_ids=[torch.device(device)] if device_type == 'cuda' else None)
    tag_inputs = [name for name in TAG_FILES if model_args[f"n_{name}"] > 0]
    char_counts = load_char_counts(data_dir)
    accum_steps = cfg.gradient_accumulation_steps // world_size
    return SimpleNamespace(
        cfg=cfg, rank=rank, world_size=world_size, device=device, dtype=dtype, model_args=model_args,
        model=model, eval_model=eval_model, train_model=train_model, optimizer=optimizer, scaler=scaler,
        autocast=autocast_context(device_type, dtype), accum_steps=accum_steps,
        windows=Windows(data_dir, cfg.block_size, cfg.batch_size, tag_inputs, device),
        char_counts=None if char_counts is None else torch.as_tensor(char_counts, device=device),
        tokens_per_iter=cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps,
        peak_flops=cfg.peak_flops or peak_flops_of(device, dtype),
        start_iter=checkpoint['iter_num'] if checkpoint else 0,
        best_val_loss=checkpoint['best_val_loss'] if checkpoint else math.inf)


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from == 'scratch' and os.environ.get('RANK', '0') == '0':
        open(os.path.join(cfg.out_dir, 'log.jsonl'), 'w').close()  # a new run starts a new log
    run = build_run(cfg)
    if run.rank == 0:
        print(f"{run.model.num_params() / 1e6:.2f}M parameters, {run.world_size} process(es) on "
              f"{run.device} in {run.dtype}, {run.tokens_per_iter:,} tokens per iteration, "
              f"MFU against a peak of {run.peak_flops / 1e9:,.0f} GFLOP/s")
    iter_num, best_val_loss = run.start_iter, run.best_val_loss
    loop_start = time.time()
    interval_seconds, interval_iters = 0.0, 0  # training time since the last log line
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
            metrics, best_val_loss = evaluate_and_save(run, iter_num, best_val_loss)
        if iter_num >= cfg.max_iters:
            break
        step_start = time.time()
        loss, skipped = train_step(run, iter_num)
        log_now = iter_num % cfg.log_interval == 0 or skipped  # the same on every rank
        if log_now:  # reading the loss waits for the device: only here, not every step
            loss = mean_loss_over_ranks(run, loss, iter_num)
        interval_seconds, interval_iters = interval_seconds + time.time() - step_start, interval_iters + 1
        if log_now:
            seconds_per_iter = (time.time() - loop_start) / (iter_num - run.start_iter + 1)
            log_progress(run, iter_num, loss, skipped, interval_seconds / interval_iters, seconds_per_iter)
            interval_seconds, interval_iters = 0.0, 0
        iter_num += 1
    if run.world_size > 1:
        checksums = ranks_in_step_checksums(run)
        log(run, {'iter': iter_num, 'param_checksums': checksums},
            f"ranks in step: {len(set(checksums)) == 1} (weight checksums {checksums})")
    if run.rank == 0:
        print(f"done in {(time.time() - loop_start) / 60:.1f} min: val loss {metrics['val_loss']:.4f}, "
              f"val bits/char {bpc_text(metrics)}; best val loss {best_val_loss:.4f}; "
              f"checkpoints in {cfg.out_dir}/")
    if run.world_size > 1:
        leave_process_group()


if __name__ == '__main__':
    main()
