"""
Pretraining a GPT on Chinese medical text. Read main() top to bottom: settings; DDP, device and
precision; data; model; optimiser; then the training loop (evaluate and checkpoint, step, log).

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

from checkpoint import refuse_previous_run, save_checkpoint, tokenizer_record
from common import (
    TAG_FILES,
    Windows,
    busy_note,
    check_attention_memory,
    check_token_files,
    data_dir_of,
    learning_rate_at,
    load_char_counts,
    load_meta,
    peak_flops,
    resolve_device_and_dtype,
)
from configurator import configure, given_keys
from model import GPT, GPTConfig
from optim import configure_optimizers
from train_start import check_config, hold_out_dir, load_starting_point, report_passes

# Defaults are the paper's base model (CMed-GPT); config/*.py and --key=value override them.
# fmt: off
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
    # optimiser: AdamW for every weight, or Muon for the blocks' matrices and AdamW for the rest (optim.py)
    optimizer='adamw',             # 'adamw' or 'muon'
    muon_lr=0.02,                  # muon: the peak rate of the Muon matrices (learning_rate is AdamW's)
    muon_momentum=0.95,
    learning_rate=1e-4,            # peak, reached after warm-up
    max_iters=100000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=0.5,                 # clip the global gradient norm to this; 0 = off
    # schedule: linear warm-up, then down to min_lr at lr_decay_iters (held there after): 'cosine' all the way,
    # or 'wsd' (held at the peak, then a straight line down over the last warmdown_fraction)
    lr_schedule='cosine',
    warmdown_fraction=0.2,
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
# fmt: on
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation random numbers apart


def main(argv=None):
    # ----------------------------------------------------------------------------------------------- settings
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    # everything is checked before out_dir is touched: a failed start loses nothing of a previous run
    check_config(cfg)
    if cfg.init_from != 'resume':
        refuse_previous_run(cfg.out_dir, cfg.overwrite)
    data_dir = data_dir_of(cfg.dataset)
    meta = load_meta(data_dir)
    # Resuming or continuing from a checkpoint: the checkpoint's architecture (layers, width, block_size,
    # tag tables) replaces the settings' in cfg, so the data below is read in windows the model fits.
    model_args, checkpoint = load_starting_point(cfg, data_dir, meta, given_keys(DEFAULTS, argv))

    # ------------------------------------------------------------------------------ DDP, device and precision
    device, dtype, dtype_reason = resolve_device_and_dtype(cfg.device, cfg.dtype)  # 'auto' -> the fastest here
    ddp = 'RANK' in os.environ  # started by torchrun: this process is one rank of several
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):  # one GPU per process
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master_process = rank == 0  # the one that prints, logs and writes checkpoints
    if cfg.gradient_accumulation_steps % world_size:
        raise SystemExit(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
            f"multiple of the number of processes ({world_size})"
        )
    accum_steps = cfg.gradient_accumulation_steps // world_size  # micro-steps per iteration on this rank
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps  # over all ranks
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: float32 speed for free
    torch.backends.cudnn.allow_tf32 = True
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'  # what autocast and the scaler want
    # bf16/fp16: autocast runs the matmuls in that type while the weights stay float32; float32: nothing
    ptdtype = getattr(torch, dtype)
    autocast = contextlib.nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    # fp16's small range lets gradients underflow: the scaler multiplies the loss up before backward and
    # divides the gradients back before the step (with bf16 or float32 it does nothing)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')

    # --------------------------------------------------------------------------------------------------- data
    train_tokens = check_token_files(data_dir, cfg.block_size)
    tag_inputs = [name for name in TAG_FILES if model_args[f"n_{name}"] > 0]  # tags the model has a table for
    windows = Windows(data_dir, cfg.block_size, cfg.batch_size, tag_inputs, device)
    char_counts = load_char_counts(data_dir)  # characters per token id, for bits per character
    char_counts = None if char_counts is None else torch.as_tensor(char_counts, device=device)
    tokenizer_path = os.path.join(data_dir, 'tokenizer.model')
    tokenizer = tokenizer_record(tokenizer_path) if os.path.isfile(tokenizer_path) else None  # saved with the weights

    # -------------------------------------------------------------------------------------------------- model
    check_attention_memory(cfg.block_size, cfg.batch_size, model_args['n_layer'], model_args['n_head'], device)
    model = GPT(GPTConfig(**model_args)).to(device)  # scratch: these random weights
    resuming = cfg.init_from == 'resume'
    if resuming:  # out_dir/ckpt.pt: its weights here, its optimiser, scaler and iteration below
        model.load_state_dict(checkpoint['model'])
    elif checkpoint is not None:  # continued pretraining: the weights; tag tables they lack start at zero
        missing, unexpected = model.load_state_dict(checkpoint['model'], strict=False)
        if unexpected or any(not name.startswith(('wle.', 'wee.')) for name in missing):
            raise SystemExit(
                f"{cfg.init_from} does not fit its own model_args: missing {missing}, unexpected {unexpected}"
            )

    # ---------------------------------------------------------------------------------------------- optimiser
    betas = (cfg.beta1, cfg.beta2)
    optimizer = configure_optimizers(
        model, cfg.optimizer, cfg.weight_decay, cfg.learning_rate, betas, device_type, cfg.muon_lr, cfg.muon_momentum
    )
    iter_num, best_val_loss = 0, math.inf  # continued pretraining too: a new schedule from iteration 0
    if resuming:
        saved_optimizer = checkpoint['config'].get('optimizer', 'adamw')
        if saved_optimizer != cfg.optimizer:  # the saved state holds the other optimiser's moments
            raise SystemExit(
                f"{cfg.out_dir}/ckpt.pt was trained with --optimizer={saved_optimizer}: resume with "
                f"it, or start a new run (--init_from={cfg.out_dir} continues from its weights)"
            )
        optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['scaler']:  # {} from a run without fp16: the fresh scaler is right then
            scaler.load_state_dict(checkpoint['scaler'])
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    checkpoint = None  # free the loaded copy
    # `model` stays the plain module (its state_dict is what checkpoints hold); the loop runs the wrappers:
    # torch.compile's, and DDP's, which averages the gradients over the ranks during backward
    eval_model = torch.compile(model) if cfg.compile else model
    train_model = eval_model
    if ddp:
        train_model = DDP(eval_model, device_ids=[torch.device(device)] if device_type == 'cuda' else None)

    # ---------------------------------------------------------------------------------------------- the start
    # every check has passed: only now does the run hold out_dir (and a new run clear the old files)
    out_dir_lock = hold_out_dir(cfg.out_dir, cfg.init_from != 'resume', cfg.overwrite) if master_process else None
    # MFU divides by a peak FLOP/s. A peak measured while other work runs is too low (and MFU too high): a
    # measured peak is measured again at every evaluation and the best kept, so it only ever gets truer.
    peak, peak_source = (cfg.peak_flops, 'given') if cfg.peak_flops else peak_flops(device, dtype)
    remeasure_peak = peak_source.startswith('measured')
    if master_process:
        print(
            f"{model.num_params() / 1e6:.2f}M parameters, {world_size} process(es) on {device} in {dtype} "
            f"({dtype_reason}), {tokens_per_iter:,} tokens per iteration; MFU against a peak of "
            f"{peak / 1e9:,.0f} GFLOP/s ({peak_source}){busy_note(device) if remeasure_peak else ''}"
        )
        report_passes((cfg.max_iters - iter_num) * tokens_per_iter, train_tokens, data_dir)

    @torch.no_grad()
    def estimate_loss():
        """Train/val loss on eval_iters fixed batches per split (over all ranks), val perplexity, bits/char."""
        totals = {}  # split -> (nats, tokens, characters), summed over batches and ranks
        eval_model.eval()
        for split in ('train', 'val'):
            # the same windows at every evaluation, so successive losses differ only by the model
            rng = window_rng(cfg.seed, rank, EVAL_STREAM, ('train', 'val').index(split))
            nats = tokens = chars = 0.0
            for _ in range(cfg.eval_iters):
                batch = windows.batch(split, rng)
                with autocast:
                    _, loss = eval_model(**batch)
                n = batch['targets'].numel()
                nats, tokens = nats + loss.item() * n, tokens + n
                if char_counts is not None:
                    chars += char_counts[batch['targets']].sum().item()
            totals[split] = sum_over_ranks([nats, tokens, chars], world_size, device)
        eval_model.train()
        val_nats, val_tokens, val_chars = totals['val']
        val_loss = val_nats / val_tokens
        train_nats, train_tokens, train_chars = totals['train']
        return {
            'train_loss': train_nats / train_tokens,
            'val_loss': val_loss,
            'val_ppl': math.exp(val_loss) if val_loss < 700 else math.inf,  # exp overflows past ~709
            'train_bpc': train_nats / math.log(2) / train_chars if train_chars else None,
            'val_bpc': val_nats / math.log(2) / val_chars if val_chars else None,
        }

    # ----------------------------------------------------------------------------------------------- the loop
    start_iter, saved = iter_num, False
    loop_start = time.time()
    interval_seconds, interval_iters = 0.0, 0  # training time since the last log line
    train_seconds = 0.0  # time spent in optimiser steps (not evaluating or saving): what plot.py draws against
    while True:
        # evaluate, and checkpoint what was learned, every eval_interval iterations and at the end
        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
            metrics = estimate_loss()
            if remeasure_peak:
                peak = max(peak, peak_flops(device, dtype)[0])
            if master_process:
                tokens_read = (iter_num - start_iter) * tokens_per_iter
                record = {'iter': iter_num, **metrics, 'train_s': round(train_seconds, 2), 'tokens': tokens_read}
                log(
                    cfg.out_dir,
                    record,
                    f"eval {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
                    f"val ppl {metrics['val_ppl']:.2f}, val bits/char {bpc_text(metrics)}",
                )
            if not math.isfinite(metrics['val_loss']):
                raise SystemExit(f"stopping: non-finite val loss at iter {iter_num}; no checkpoint written.")
            improved = metrics['val_loss'] < best_val_loss
            best_val_loss = min(metrics['val_loss'], best_val_loss)
            if master_process and iter_num > start_iter:  # nothing new has been learned before
                checkpoint = {
                    'model': model.state_dict(),
                    'model_args': model_args,
                    'config': vars(cfg),
                    'optimizer': optimizer.state_dict(),
                    'scaler': scaler.state_dict(),
                    'iter_num': iter_num,
                    'best_val_loss': best_val_loss,
                    'tokenizer': tokenizer,
                }
                # best.pt first: a kill between the two writes must not leave best.pt behind the best ckpt.pt records
                if improved:
                    save_checkpoint(checkpoint, os.path.join(cfg.out_dir, 'best.pt'))
                if improved or cfg.always_save_checkpoint:
                    save_checkpoint(checkpoint, os.path.join(cfg.out_dir, 'ckpt.pt'))
                saved = True
        if iter_num >= cfg.max_iters:
            break

        # one optimiser step over accum_steps micro-batches
        step_start = time.time()
        # Windows and dropout masks are a function of (seed, rank, iteration) alone, so a resumed run
        # draws exactly what the uninterrupted one drew, with nothing but iter_num to restore.
        rng = window_rng(cfg.seed, rank, TRAIN_STREAM, iter_num)
        torch.manual_seed(int(rng.integers(2**62)))
        lr = learning_rate_at(
            iter_num,
            cfg.learning_rate,
            cfg.min_lr,
            cfg.warmup_iters,
            cfg.lr_decay_iters,
            cfg.lr_schedule,
            cfg.warmdown_fraction,
        )
        for group in optimizer.param_groups:  # optim.py: a group's peak is lr_scale times learning_rate's
            group['lr'] = lr * group.get('lr_scale', 1.0)
        loss_sum = torch.zeros((), device=device)  # kept on the device: reading it would wait for the GPU
        for micro_step in range(accum_steps):
            batch = windows.batch('train', rng)
            # DDP averages gradients over ranks in every backward; only the last micro-step's needs it
            skip_sync = ddp and micro_step < accum_steps - 1
            with train_model.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast:
                    _, loss = train_model(**batch)
                scaler.scale(loss / accum_steps).backward()  # gradients add up over the micro-steps
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # with fp16, skips the step when a gradient is inf/nan
        scaler.update()  # ... and then lowers the scale: that is how the skip shows
        optimizer.zero_grad(set_to_none=True)
        skipped = scaler.get_scale() < scale_before

        # log: the loss averaged over ranks, speed, MFU
        log_now = iter_num % cfg.log_interval == 0 or skipped  # the same on every rank
        if log_now:  # reading the loss waits for the device: only here, not every step
            loss = sum_over_ranks([(loss_sum / accum_steps).item()], world_size, device)[0] / world_size
            if not math.isfinite(loss) and not scaler.is_enabled():  # fp16 skips such a step instead
                raise SystemExit(
                    f"stopping: non-finite training loss ({loss}) at iter {iter_num} with dtype "
                    f"{dtype} (checked every log_interval={cfg.log_interval} iterations); no "
                    f"checkpoint was written after it. Lower learning_rate or check the data."
                )
        step_seconds = time.time() - step_start
        train_seconds += step_seconds
        interval_seconds, interval_iters = interval_seconds + step_seconds, interval_iters + 1
        if log_now and master_process:
            dt = interval_seconds / interval_iters  # seconds per iteration since the last log line
            tokens_per_s = tokens_per_iter / dt
            # at the windows' length, which may be below the model's block_size
            mfu = model.estimate_mfu(cfg.batch_size * accum_steps, dt, peak, cfg.block_size)
            eta = (time.time() - loop_start) / (iter_num - start_iter + 1) * (cfg.max_iters - iter_num - 1)
            skip_note = f", fp16 overflow: step skipped, scale now {scaler.get_scale():g}" if skipped else ""
            record = {'iter': iter_num, 'loss': loss, 'lr': lr, 'tokens_per_s': tokens_per_s, 'mfu': mfu}
            record.update(skipped_step=skipped, train_s=round(train_seconds, 2))
            log(
                cfg.out_dir,
                record,
                f"iter {iter_num}/{cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
                f"{tokens_per_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min{skip_note}",
            )
        if log_now:
            interval_seconds, interval_iters = 0.0, 0
        iter_num += 1

    if ddp:  # DDP must leave every rank with the same weights: compare each rank's sum of squared weights
        checksum = sum(p.detach().double().square().sum() for p in model.parameters()).reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        checksums = [c.item() for c in gathered]
        if master_process:
            log(
                cfg.out_dir,
                {'iter': iter_num, 'param_checksums': checksums},
                f"ranks in step: {len(set(checksums)) == 1} (weight checksums {checksums})",
            )
    if master_process:
        written = f"checkpoints in {cfg.out_dir}/" if saved else "no checkpoint written (max_iters=0)"
        print(
            f"done in {(time.time() - loop_start) / 60:.1f} min: val loss {metrics['val_loss']:.4f}, "
            f"val bits/char {bpc_text(metrics)}; best val loss {best_val_loss:.4f}; {written}"
        )
    del out_dir_lock  # held to here: the lock is released (as it is when the process ends)
    if ddp:
        leave_process_group()


def window_rng(seed, rank, stream, index):
    """Random numbers that depend on (seed, rank, stream, index) only: each rank reads its own windows."""
    return np.random.default_rng([seed, rank, stream, index])


def sum_over_ranks(values, world_size, device):
    """Element-wise sum of a list of numbers over all ranks (the list itself when single process)."""
    if world_size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def log(out_dir, record, text):
    """Print a line and append its JSON record to out_dir/log.jsonl."""
    print(text, flush=True)
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def bpc_text(metrics):
    return 'n/a (no tokenizer.model)' if metrics['val_bpc'] is None else f"{metrics['val_bpc']:.4f}"


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


if __name__ == '__main__':
    main()
