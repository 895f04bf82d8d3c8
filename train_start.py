"""
How a pretraining run starts, before its first step (train.py's main() calls these): the options checked, the
starting point loaded (new weights, out_dir/ckpt.pt to resume, or another run's weights to continue from) with
the data's tokenizer checked against it and its architecture adopted, out_dir held, and how many passes over the
data the run will make. Each refusal is one line naming the key or file and the fix.
"""

import math
import os

from checkpoint import check_tokenizer, claim_out_dir, load_checkpoint, start_fresh, tokenizer_record
from common import new_model_args, tag_table_size

ARCHITECTURE = ('n_layer', 'n_head', 'n_embd', 'bias')  # what a checkpoint fixes, with block_size and the tables
MAX_PASSES = 4  # more passes over the training tokens than this: the model memorises them


def check_config(cfg):
    """Every option a number must be, with its range: one line naming the key, before any work."""
    rules = [
        ('batch_size', cfg.batch_size >= 1, '>= 1'),
        ('block_size', cfg.block_size >= 1, '>= 1'),
        ('gradient_accumulation_steps', cfg.gradient_accumulation_steps >= 1, '>= 1'),
        ('max_iters', cfg.max_iters >= 0, '>= 0'),
        ('eval_interval', cfg.eval_interval >= 1, '>= 1'),
        ('eval_iters', cfg.eval_iters >= 1, '>= 1'),
        ('log_interval', cfg.log_interval >= 1, '>= 1'),
        ('warmup_iters', cfg.warmup_iters >= 0, '>= 0'),
        ('lr_decay_iters', cfg.lr_decay_iters >= cfg.warmup_iters, '>= warmup_iters'),
        ('learning_rate', 0 < cfg.learning_rate < math.inf, 'a finite number > 0'),
        ('min_lr', 0 <= cfg.min_lr <= cfg.learning_rate, 'in [0, learning_rate]'),
        ('weight_decay', 0 <= cfg.weight_decay < math.inf, 'a finite number >= 0'),
        ('grad_clip', 0 <= cfg.grad_clip < math.inf, 'a finite number >= 0 (0 = off)'),
        ('dropout', 0 <= cfg.dropout < 1, 'in [0, 1)'),
        ('beta1', 0 <= cfg.beta1 < 1, 'in [0, 1)'),
        ('beta2', 0 <= cfg.beta2 < 1, 'in [0, 1)'),
        ('attention', cfg.attention in ('manual', 'fused'), "'manual' or 'fused'"),
        ('optimizer', cfg.optimizer in ('adamw', 'muon'), "'adamw' or 'muon'"),
        ('muon_lr', 0 < cfg.muon_lr < math.inf, 'a finite number > 0'),
        ('muon_momentum', 0 <= cfg.muon_momentum < 1, 'in [0, 1)'),
        ('lr_schedule', cfg.lr_schedule in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
        ('warmdown_fraction', 0 < cfg.warmdown_fraction <= 1, 'in (0, 1]'),
    ]
    for key, ok, expected in rules:
        if not ok:
            raise SystemExit(f"--{key} must be {expected}, not {getattr(cfg, key)!r}")


def load_starting_point(cfg, data_dir, meta, given):
    """(model_args, checkpoint): new ones and None from scratch; out_dir/ckpt.pt's when resuming; for
    continued pretraining (init_from = a run's folder or checkpoint, e.g. an imported GPT2-Chinese) its
    weights alone, with tables added as asked: the optimiser and the schedule start anew. A checkpoint
    must fit the data's tokenizer, and its architecture is adopted into cfg (adopt_architecture)."""
    if cfg.init_from == 'scratch':
        return new_model_args(cfg, meta), None
    resuming = cfg.init_from == 'resume'
    path = os.path.join(cfg.out_dir, 'ckpt.pt') if resuming else cfg.init_from
    path = os.path.join(path, 'best.pt') if os.path.isdir(path) else path
    keys = (
        ('model', 'model_args', 'optimizer', 'scaler', 'iter_num', 'best_val_loss')
        if resuming
        else ('model', 'model_args')
    )
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
        raise SystemExit(
            f"{path} has a vocabulary of {model_args['vocab_size']:,} but {data_dir} one of "
            f"{meta['vocab_size']:,}: prepare the data with the model's tokenizer"
        )
    if resuming:
        return model_args, checkpoint
    model_args.update(
        dropout=cfg.dropout,
        attention=cfg.attention,
        n_lexical=model_args['n_lexical'] or (tag_table_size(meta['lexical_map']) if cfg.lexical else 0),
        n_entity=model_args['n_entity'] or (tag_table_size(meta['entity_map']) if cfg.entity else 0),
    )
    return model_args, {'model': checkpoint['model']}


def adopt_architecture(cfg, model_args, source, windows_may_be_shorter, given):
    """The model's shape comes from the checkpoint. A shape key the config file or the command line set
    (`given`, even to the default's value) to another value is an error naming both; the others take the
    checkpoint's value, so that the config saved with the next checkpoint tells the truth."""
    wanted = {key: model_args[key] for key in ARCHITECTURE}
    wanted.update(
        lexical=model_args['n_lexical'] > 0 or (windows_may_be_shorter and cfg.lexical),
        entity=model_args['n_entity'] > 0 or (windows_may_be_shorter and cfg.entity),
    )
    if not windows_may_be_shorter:
        wanted['block_size'] = model_args['block_size']
    for key, value in wanted.items():
        asked = getattr(cfg, key)
        # a table the checkpoint has is kept though not asked for; one it lacks is never added on resume
        conflict = asked if key in ('lexical', 'entity') else key in given
        if conflict and asked != value:
            raise SystemExit(
                f"--{key}={asked!r} differs from {source}'s {value!r}: the model keeps its architecture "
                f"(drop --{key}, or start a new run in another --out_dir)"
            )
        setattr(cfg, key, value)
    if cfg.block_size > model_args['block_size']:
        raise SystemExit(
            f"--block_size={cfg.block_size} is longer than {source}'s {model_args['block_size']} "
            f"positions: lower --block_size"
        )


def hold_out_dir(out_dir, new_run, overwrite):
    """Lock out_dir for this process, so that a second run into it is refused, and for a new run clear the
    previous run's files (refused again here without --overwrite: out_dir may have changed since the first
    check). Returns the lock file: keep it referenced, the system releases it when the process ends."""
    lock = claim_out_dir(out_dir)
    if new_run:
        start_fresh(out_dir, overwrite)
    return lock


def report_passes(tokens_to_read, train_tokens, data_dir):
    """How much data the run reads, and a warning when it will memorise its corpus."""
    passes = tokens_to_read / train_tokens
    print(
        f"this run reads {tokens_to_read:,} tokens: {passes:,.1f} passes over the {train_tokens:,} training "
        f"tokens of {data_dir}"
    )
    if passes > MAX_PASSES:
        print(
            f"WARNING: {passes:,.0f} passes (more than {MAX_PASSES}): the model will memorise the corpus. Add "
            f"data (python -m prepare.pretrain --corpus ...) or lower --max_iters.",
            flush=True,
        )
