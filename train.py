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

from checkpoint import check_tokenizer, claim_out_dir, load_checkpoint, refuse_previous_run, save_checkpoint, \
    start_fresh, tokenizer_record
from common import TAG_FILES, Windows, autocast_context, check_attention_memory, check_token_files, data_dir_of, \
    device_type, learning_rate_at, load_char_counts, load_meta, new_model_args, optimizer_step, peak_flops, \
    resolve_device_and_dtype, tag_table_size
from configurator import configure, given_keys
from model import GPT, GPTConfig

# Defaults are the paper's base model (CMed-GPT); config/*.py and --key=value override them.
DEFAULTS = dict(
    # output and evaluation
    out_dir='out',
    init_from='scratch',           # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint folder/file to continue
                                   # pretraining from (e.g. convert.py's GPT2-Chinese): its weights, a new schedule
    overwrite=False,               # scratch only: replace the previous run in out_dir (refused otherwise)
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
    dtype='auto',                  # 'auto': bf16 on GPUs that have it (else fp16), bf16 on CPUs with AMX, else float32
    compile=False,                 # torch.compile the model
    seed=1337,
    peak_flops=0.0,                # the device's peak FLOP/s for MFU; 0 = look it up or measure it
)
TRAIN_STREAM, EVAL_STREAM = 0, 1   # keep training and evaluation random numbers apart
ARCHITECTURE = ('n_layer', 'n_head', 'n_embd', 'bias')  # what a checkpoint fixes, with block_size and the tables
MAX_PASSES = 4                     # more passes over the training tokens than this: the model memorises them


# ----------------------------------------------------------------------------- checks before anything is touched

def check_config(cfg):
    """Every option a number must be, with its range: one line naming the key, before any work."""
    rules = [('batch_size', cfg.batch_size >= 1, '>= 1'), ('block_size', cfg.block_size >= 1, '>= 1'),
             ('gradient_accumulation_steps', cfg.gradient_accumulation_steps >= 1, '>= 1'),
             ('max_iters', cfg.max_iters >= 0, '>= 0'), ('eval_interval', cfg.eval_interval >= 1, '>= 1'),
             ('eval_iters', cfg.eval_iters >= 1, '>= 1'), ('log_interval', cfg.log_interval >= 1, '>= 1'),
             ('warmup_iters', cfg.warmup_iters >= 0, '>= 0'),
             ('lr_decay_iters', cfg.lr_decay_iters >= cfg.warmup_iters, '>= warmup_iters'),
             ('learning_rate', 0 < cfg.learning_rate < math.inf, 'a finite number > 0'),
             ('min_lr', 0 <= cfg.min_lr <= cfg.learning_rate, 'in [0, learning_rate]'),
             ('weight_decay', 0 <= cfg.weight_decay < math.inf, 'a finite number >= 0'),
             ('grad_clip', 0 <= cfg.grad_clip < math.inf, 'a finite number >= 0 (0 = off)'),
             ('dropout', 0 <= cfg.dropout < 1, 'in [0, 1)'), ('beta1', 0 <= cfg.beta1 < 1, 'in [0, 1)'),
             ('beta2', 0 <= cfg.beta2 < 1, 'in [0, 1)'),
             ('attention', cfg.attention in ('manual', 'fused'), "'manual' or 'fused'")]
    for key, ok, expected in rules:
        if not ok:
            raise SystemExit(f"--{key} must be {expected}, not {getattr(cfg, key)!r}")


def adopt_architecture(cfg, model_args, source, windows_may_be_shorter, given):
    """The model's shape comes from the checkpoint. A shape key the config file or the command line set
    (`given`, even to the default's value) to another value is an error naming both; the others take the
    checkpoint's value, so that the config saved with the next checkpoint tells the truth."""
    wanted = {key: model_args[key] for key in ARCHITECTURE}
    wanted.update(lexical=model_args['n_lexical'] > 0 or (windows_may_be_shorter and cfg.lexical),
                  entity=model_args['n_entity'] > 0 or (windows_may_be_shorter and cfg.entity))
    if not windows_may_be_shorter:
        wanted['block_size'] = model_args['block_size']
    for key, value in wanted.items():
        asked = getattr(cfg, key)
        # a table the checkpoint has is kept though not asked for; one it lacks is never added on resume
        conflict = asked if key in ('lexical', 'entity') else key in given
        if conflict and asked != value:
            raise SystemExit(f"--{key}={asked!r} differs from {source}'s {value!r}: the model keeps its architecture "
                             f"(drop --{key}, or start a new run in another --out_dir)")
        setattr(cfg, key, value)
    if cfg.block_size > model_args['block_size']:
        raise SystemExit(f"--block_size={cfg.block_size} is longer than {source}'s {model_args['block_size']} "
                         f"positions: lower --block_size")


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


# ----------------------------------------------------------------------------- training

def window_rng(training, stream, index):
    """Random numbers that depend on (seed, rank, stream, index) only: each rank reads its own windows."""
    return np.random.default_rng([training.cfg.seed, training.rank, stream, index])


def sum_over_ranks(values, world_size, device):
    """Element-wise sum of a list of numbers over all ranks (the list itself when single process)."""
    if world_size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def train_step(training, iter_num):
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns (this rank's mean loss as a tensor on the device, whether fp16 skipped the step). The loss
    stays on the device so that a GPU is not made to wait for it on every step."""
    # Windows and dropout masks are a function of (seed, rank, iteration) alone, so a resumed run
    # draws exactly what the uninterrupted one drew, with nothing but iter_num to restore.
    rng = window_rng(training, TRAIN_STREAM, iter_num)
    torch.manual_seed(int(rng.integers(2 ** 62)))
    loss_sum = torch.zeros((), device=training.device)
    for micro_step in range(training.accum_steps):
        batch = training.windows.batch('train', rng)
        is_last = micro_step == training.accum_steps - 1
        # DDP averages gradients over ranks on every backward; only the last micro-step needs it
        skip_sync = training.world_size > 1 and not is_last
        with training.train_model.no_sync() if skip_sync else contextlib.nullcontext():
            with training.autocast:
                _, loss = training.train_model(**batch)
            training.scaler.scale(loss / training.accum_steps).backward()
        loss_sum += loss.detach()
    skipped = optimizer_step(training.optimizer, training.scaler, training.model.parameters(), training.cfg.grad_clip,
                             learning_rate_of(training.cfg, iter_num))
    return loss_sum / training.accum_steps, skipped


def learning_rate_of(cfg, iter_num):
    return learning_rate_at(iter_num, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)


def mean_loss_over_ranks(training, loss, iter_num):
    """The training loss averaged over ranks, as a number; stops the run if it is not finite."""
    loss = sum_over_ranks([loss.item()], training.world_size, training.device)[0] / training.world_size
    if not math.isfinite(loss) and not training.scaler.is_enabled():
        raise SystemExit(f"stopping: non-finite training loss ({loss}) at iter {iter_num} with dtype "
                         f"{training.dtype} (checked every log_interval={training.cfg.log_interval} iterations); "
                         f"no checkpoint was written after it. Lower learning_rate or check the data.")
    return loss


@torch.no_grad()
def evaluate(training):
    """Train/val loss on eval_iters fixed batches per split (over all ranks), val perplexity, bits/char."""
    training.eval_model.eval()
    train_nats, train_tokens, _ = split_totals(training, 'train')
    val_nats, val_tokens, val_chars = split_totals(training, 'val')
    training.eval_model.train()
    val_loss = val_nats / val_tokens
    return {'train_loss': train_nats / train_tokens, 'val_loss': val_loss,
            'val_ppl': math.exp(val_loss) if val_loss < 700 else math.inf,  # exp overflows past ~709
            'val_bpc': val_nats / math.log(2) / val_chars if val_chars else None}


def split_totals(training, split):
    """(nats, tokens, characters) summed over eval_iters batches of one split and over all ranks."""
    # the same windows at every evaluation, so successive losses differ only by the model
    rng = window_rng(training, EVAL_STREAM, ('train', 'val').index(split))
    nats = tokens = chars = 0.0
    for _ in range(training.cfg.eval_iters):
        batch = training.windows.batch(split, rng)
        with training.autocast:
            _, loss = training.eval_model(**batch)
        n = batch['targets'].numel()
        nats, tokens = nats + loss.item() * n, tokens + n
        if training.char_counts is not None:
            chars += training.char_counts[batch['targets']].sum().item()
    return sum_over_ranks([nats, tokens, chars], training.world_size, training.device)


def ranks_in_step_checksums(training):
    """Each rank's sum of squared weights: DDP must leave every rank with the same numbers."""
    checksum = sum(p.detach().double().square().sum() for p in training.model.parameters()).reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(training.world_size)]
    dist.all_gather(gathered, checksum)
    return [c.item() for c in gathered]


def leave_process_group():
    """Leave torchrun's process group and end this process, skipping the interpreter's teardown."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # A Gloo worker thread may still be releasing the last collective's tensors (which takes the GIL)
    # after wait() returned; DDP keeps the group alive, so destroy does not join it. If Python is tearing
    # down by then, 3.11 kills the thread mid-destructor and the process aborts ("terminate called without
    # an active exception"). Everything is written and flushed: exit now, with no teardown to race.
    os._exit(0)


# ----------------------------------------------------------------------------- output

def log(training, record, text):
    """Print a line and append a JSON record to out_dir/log.jsonl (rank 0 only)."""
    if training.rank == 0:
        print(text, flush=True)
        with open(os.path.join(training.cfg.out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')


def checkpoint_of(training, iter_num, best_val_loss):
    return {'model': training.model.state_dict(), 'model_args': training.model_args, 'config': vars(training.cfg),
            'optimizer': training.optimizer.state_dict(), 'scaler': training.scaler.state_dict(),
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'tokenizer': training.tokenizer}


def evaluate_and_save(training, iter_num, best_val_loss):
    """Evaluate, log, write ckpt.pt / best.pt (rank 0); returns the metrics and the new best val loss."""
    metrics = evaluate(training)
    log(training, {'iter': iter_num, **metrics},
        f"eval {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
        f"val ppl {metrics['val_ppl']:.2f}, val bits/char {bpc_text(metrics)}")
    val_loss = metrics['val_loss']
    if not math.isfinite(val_loss):
        raise SystemExit(f"stopping: non-finite val loss at iter {iter_num}; no checkpoint written.")
    improved = val_loss < best_val_loss
    best_val_loss = min(val_loss, best_val_loss)
    if training.rank == 0 and iter_num > training.start_iter:  # nothing new has been learned before
        checkpoint = checkpoint_of(training, iter_num, best_val_loss)
        # best.pt first: a kill between the two writes must not leave best.pt behind the best ckpt.pt records
        if improved:
            save_checkpoint(checkpoint, os.path.join(training.cfg.out_dir, 'best.pt'))
        if improved or training.cfg.always_save_checkpoint:
            save_checkpoint(checkpoint, os.path.join(training.cfg.out_dir, 'ckpt.pt'))
        training.saved = True
    return metrics, best_val_loss


def bpc_text(metrics):
    return 'n/a (no tokenizer.model)' if metrics['val_bpc'] is None else f"{metrics['val_bpc']:.4f}"


def log_progress(training, iter_num, loss, skipped, dt, seconds_per_iter):
    tokens_per_s = training.tokens_per_iter / dt
    mfu = training.model.estimate_mfu(training.cfg.batch_size * training.accum_steps, dt, training.peak_flops,
                                      training.cfg.block_size)  # the windows' length: it may be below the model's
    lr = learning_rate_of(training.cfg, iter_num)
    eta = seconds_per_iter * (training.cfg.max_iters - iter_num - 1)
    skip_note = f", fp16 overflow: step skipped, scale now {training.scaler.get_scale():g}" if skipped else ""
    log(training, {'iter': iter_num, 'loss': loss, 'lr': lr, 'tokens_per_s': tokens_per_s, 'mfu': mfu,
                   'skipped_step': skipped},
        f"iter {iter_num}/{training.cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
        f"{tokens_per_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min{skip_note}")


# ----------------------------------------------------------------------------- main

def report_passes(cfg, training, train_tokens, data_dir):
    """How much data the run reads, and a warning when it will memorise its corpus."""
    tokens_to_read = (cfg.max_iters - training.start_iter) * training.tokens_per_iter
    passes = tokens_to_read / train_tokens
    print(f"this run reads {tokens_to_read:,} tokens: {passes:,.1f} passes over the {train_tokens:,} training "
          f"tokens of {data_dir}")
    if passes > MAX_PASSES:
        print(f"WARNING: {passes:,.0f} passes (more than {MAX_PASSES}): the model will memorise the corpus. Add "
              f"data (python -m prepare.pretrain --corpus ...) or lower --max_iters.", flush=True)


def starting_point(cfg, data_dir, meta, given):
    """(model_args, checkpoint): new ones and None from scratch; out_dir/ckpt.pt's when resuming; for
    continued pretraining (init_from = a run's folder or checkpoint, e.g. an imported GPT2-Chinese) its
    weights alone, with tables added as asked: the optimiser and the schedule start anew."""
    if cfg.init_from == 'scratch':
        return new_model_args(cfg, meta), None
    resuming = cfg.init_from == 'resume'
    path = os.path.join(cfg.out_dir, 'ckpt.pt') if resuming else cfg.init_from
    path = os.path.join(path, 'best.pt') if os.path.isdir(path) else path
    keys = ('model', 'model_args', 'optimizer', 'scaler', 'iter_num', 'best_val_loss') if resuming else \
        ('model', 'model_args')
    try:
        checkpoint = load_checkpoint(path, 'cpu', required_keys=keys)
    except (FileNotFoundError, ValueError) as error:  # a user's mistake, not a bug: no traceback
        raise SystemExit(f"cannot {'resume' if resuming else 'start from ' + cfg.init_from}: {error}")
    model_args = dict(checkpoint['model_args'])
    adopt_architecture(cfg, model_args, path, windows_may_be_shorter=not resuming, given=given)
    beside = os.path.join(os.path.dirname(path), 'tokenizer.model')  # convert.py writes it beside best.pt
    record = checkpoint.get('tokenizer') or (tokenizer_record(beside) if os.path.isfile(beside) else None)
    if record is not None:
        check_tokenizer(record, data_dir, path)
    elif model_args['vocab_size'] != meta['vocab_size']:
        raise SystemExit(f"{path} has a vocabulary of {model_args['vocab_size']:,} but {data_dir} one of "
                         f"{meta['vocab_size']:,}: prepare the data with the model's tokenizer")
    if resuming:
        return model_args, checkpoint
    model_args.update(dropout=cfg.dropout, attention=cfg.attention,
                      n_lexical=model_args['n_lexical'] or (tag_table_size(meta['lexical_map']) if cfg.lexical else 0),
                      n_entity=model_args['n_entity'] or (tag_table_size(meta['entity_map']) if cfg.entity else 0))
    return model_args, {'model': checkpoint['model']}


def build_training(cfg, device, dtype, data_dir, model_args, checkpoint):
    """Everything a training loop needs, in one namespace: model, optimizer, data, precision, ranks."""
    rank, world_size, device = setup_distributed(device)
    if cfg.gradient_accumulation_steps % world_size:
        raise SystemExit(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
                         f"multiple of the number of processes ({world_size})")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: float32 speed for free
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device_type(device))
    scaler = torch.amp.GradScaler(device_type(device), enabled=dtype == 'float16')
    resuming = checkpoint is not None and 'optimizer' in checkpoint
    if resuming:
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['scaler']:  # {} from a run without fp16: the fresh scaler is right then
            scaler.load_state_dict(checkpoint['scaler'])
    elif checkpoint is not None:  # continued pretraining: the weights; tag tables it lacks start at zero
        missing, unexpected = model.load_state_dict(checkpoint['model'], strict=False)
        if unexpected or any(not name.startswith(('wle.', 'wee.')) for name in missing):
            raise SystemExit(f"{cfg.init_from} does not fit its own model_args: missing {missing}, unexpected {unexpected}")
    eval_model = torch.compile(model) if cfg.compile else model
    train_model = eval_model
    if world_size > 1:
        train_model = DDP(eval_model, device_ids=[torch.device(device)] if device_type(device) == 'cuda' else None)
    tag_inputs = [name for name in TAG_FILES if model_args[f"n_{name}"] > 0]
    char_counts = load_char_counts(data_dir)
    accum_steps = cfg.gradient_accumulation_steps // world_size
    peak, peak_source = (cfg.peak_flops, 'given') if cfg.peak_flops else peak_flops(device, dtype)
    tokenizer_path = os.path.join(data_dir, 'tokenizer.model')
    return SimpleNamespace(
        cfg=cfg, rank=rank, world_size=world_size, device=device, dtype=dtype, model_args=model_args,
        tokenizer=tokenizer_record(tokenizer_path) if os.path.isfile(tokenizer_path) else None, saved=False,
        model=model, eval_model=eval_model, train_model=train_model, optimizer=optimizer, scaler=scaler,
        autocast=autocast_context(device, dtype), accum_steps=accum_steps,
        windows=Windows(data_dir, cfg.block_size, cfg.batch_size, tag_inputs, device),
        char_counts=None if char_counts is None else torch.as_tensor(char_counts, device=device),
        tokens_per_iter=cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps,
        peak_flops=peak, peak_source=peak_source,
        start_iter=checkpoint['iter_num'] if resuming else 0,
        best_val_loss=checkpoint['best_val_loss'] if resuming else math.inf)


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    # everything is checked before out_dir is touched: a failed start loses nothing of a previous run
    check_config(cfg)
    if cfg.init_from != 'resume':
        refuse_previous_run(cfg.out_dir, cfg.overwrite)
    device, dtype, dtype_reason = resolve_device_and_dtype(cfg.device, cfg.dtype)
    data_dir = data_dir_of(cfg.dataset)
    meta = load_meta(data_dir)
    model_args, checkpoint = starting_point(cfg, data_dir, meta, given_keys(DEFAULTS, argv))
    train_tokens = check_token_files(data_dir, cfg.block_size)
    check_attention_memory(cfg.block_size, cfg.batch_size, model_args['n_layer'], model_args['n_head'], device)
    rank0 = os.environ.get('RANK', '0') == '0'
    lock = claim_out_dir(cfg.out_dir) if rank0 else None  # noqa: F841 (held until the process ends)
    if rank0 and cfg.init_from != 'resume':
        start_fresh(cfg.out_dir, cfg.overwrite)
    training = build_training(cfg, device, dtype, data_dir, model_args, checkpoint)
    if training.rank == 0:
        print(f"{training.model.num_params() / 1e6:.2f}M parameters, {training.world_size} process(es) on "
              f"{training.device} in {training.dtype} ({dtype_reason}), "
              f"{training.tokens_per_iter:,} tokens per iteration; MFU against a peak of "
              f"{training.peak_flops / 1e9:,.0f} GFLOP/s ({training.peak_source})")
        report_passes(cfg, training, train_tokens, data_dir)
    iter_num, best_val_loss = training.start_iter, training.best_val_loss
    loop_start = time.time()
    interval_seconds, interval_iters = 0.0, 0  # training time since the last log line
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
            metrics, best_val_loss = evaluate_and_save(training, iter_num, best_val_loss)
        if iter_num >= cfg.max_iters:
            break
        step_start = time.time()
        loss, skipped = train_step(training, iter_num)
        log_now = iter_num % cfg.log_interval == 0 or skipped  # the same on every rank
        if log_now:  # reading the loss waits for the device: only here, not every step
            loss = mean_loss_over_ranks(training, loss, iter_num)
        interval_seconds, interval_iters = interval_seconds + time.time() - step_start, interval_iters + 1
        if log_now:
            seconds_per_iter = (time.time() - loop_start) / (iter_num - training.start_iter + 1)
            log_progress(training, iter_num, loss, skipped, interval_seconds / interval_iters, seconds_per_iter)
            interval_seconds, interval_iters = 0.0, 0
        iter_num += 1
    if training.world_size > 1:
        checksums = ranks_in_step_checksums(training)
        log(training, {'iter': iter_num, 'param_checksums': checksums},
            f"ranks in step: {len(set(checksums)) == 1} (weight checksums {checksums})")
    if training.rank == 0:
        saved = f"checkpoints in {cfg.out_dir}/" if training.saved else "no checkpoint written (max_iters=0)"
        print(f"done in {(time.time() - loop_start) / 60:.1f} min: val loss {metrics['val_loss']:.4f}, "
              f"val bits/char {bpc_text(metrics)}; best val loss {best_val_loss:.4f}; {saved}")
    if training.world_size > 1:
        leave_process_group()


if __name__ == '__main__':
    main()
