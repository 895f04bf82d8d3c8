"""
Adapting a pretrained checkpoint to a task, the second half of CMed-GPT.

Full fine-tuning on COVID-DDC:    python finetune.py --init_from=out/tiny --dataset=covid --mode=full
P-tuning with 25 prompt vectors:  python finetune.py --init_from=out/tiny --mode=ptune --n_prompt=25
  ... entity-aware (CMed-GPT):    --lexical --entity
  ... prompt between source and target (BioGPT):  --prompt_position=infix
Department classification:        python finetune.py --init_from=out/tiny --dataset=department --task=classify
  ... multitask (MEDI-BERPT):     --task=multitask --lambda_lm=1.0
  ... label as text (BioGPT):     --task=label_text
The base model alone (no adaptation): --mode=none

Reads data/<dataset>/ (built by prepare/). Writes out_dir/ckpt.pt (full) or out_dir/prompt.pt (p-tuning:
only what was trained, plus the base checkpoint's fingerprint), and appends one JSON line of test
results to out_dir/results.jsonl.
"""

import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

from checkpoint import check_tokenizer, claim_out_dir, load_checkpoint, save_adapted, save_checkpoint, tokenizer_record
from common import (
    check_decoding,
    data_dir_of,
    device_type,
    learning_rate_at,
    load_meta,
    optimizer_step,
    resolve_device_and_dtype,
    tag_table_size,
)
from configurator import configure
from model import GPT, GPTConfig
from optim import configure_optimizers
from tasks import TASKS, load_task_data

DEFAULTS = dict(
    init_from='out/tiny',  # out_dir of the pretraining run to adapt (default: the quick start's)
    init_checkpoint='best.pt',  # which of its checkpoints
    out_dir='out/finetune',
    dataset='covid',  # data/<dataset>/: covid, dxy or department
    mode='full',  # 'full' (every weight trains), 'ptune' (only the prompt), 'none' (evaluate the base)
    task='dialogue',  # a task of tasks.py: 'dialogue', 'classify', 'multitask' or 'label_text'
    n_prompt=0,  # soft-prompt vectors (the paper sweeps 1, 25, 50, 75, 100); p-tuning needs > 0
    prompt_position='prefix',  # 'prefix' (CMed-GPT) or 'infix' (between source and target, BioGPT)
    prompt_reparam='none',  # 'none', 'mlp' or 'lstm' (P-tuning's re-parameterisation)
    prompt_init='random',  # 'random' or 'tokens' (embeddings of real tokens drawn from the training text)
    lexical=False,  # feed part-of-speech ids (the table is added, zero-initialised, if the base has none)
    entity=False,  # feed entity ids (likewise)
    entity_splice=False,  # baseline: append the source's entity words as text instead
    lambda_lm=1.0,  # multitask: loss = class loss + lambda_lm * LM loss on the answer
    label_template='这属于{}。',  # label_text: the target sentence for a label
    epochs=6,  # paper: 6 epochs
    max_iters=0,  # > 0 overrides epochs
    batch_size=8,  # examples per step; also per batch of validation, test and --generate_examples
    learning_rate=0.0,  # 0 = by mode: 5e-5 for full fine-tuning (paper), 3e-3 for p-tuning
    warmup_iters=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=0.5,
    dropout=0.1,
    eval_interval=200,  # evaluate on val (and keep the best) every this many iterations
    max_eval_examples=0,  # > 0: evaluate val on at most this many examples (quick runs)
    generate_examples=0,  # dialogue: replies for this many test sources, scored by BLEU/Distinct/entity F1
    max_new_tokens=64,  # ... each at most this long
    temperature=0.0,  # ... 0 = greedy, else sampled (seeded by --seed)
    top_k=0,  # ... 0 = off
    top_p=1.0,  # ... 1.0 = off
    repetition_penalty=1.0,  # ... > 1 lowers tokens already in source or reply (1.0 = off), as Hugging Face's
    no_repeat_ngram_size=0,  # ... > 0: no n-gram of this size twice in source + reply (0 = off)
    log_interval=20,
    device='auto',
    dtype='auto',
    compile=False,
    seed=1337,
)
LR_BY_MODE = {'full': 5e-5, 'ptune': 3e-3}
AT_LEAST_ONE = ('epochs', 'batch_size', 'eval_interval', 'log_interval')
NOT_NEGATIVE = (
    'max_iters',
    'n_prompt',
    'warmup_iters',
    'max_eval_examples',
    'generate_examples',
    'max_new_tokens',
    'learning_rate',
    'weight_decay',
    'grad_clip',
    'lambda_lm',
)
BELOW_ONE = ('beta1', 'beta2', 'dropout')  # each in [0, 1)


# ----------------------------------------------------------------------------- model


def build_model(cfg, base, meta):
    """The base model plus what the run adds (prompt, tag tables, class head), newcomers initialised so
    that the model computes the same function as the base at step 0 (a class head aside)."""
    model_args = dict(
        base['model_args'],
        dropout=cfg.dropout,
        n_prompt=cfg.n_prompt,
        prompt_reparam=cfg.prompt_reparam,
        n_classes=len(meta['label_names']) if TASKS[cfg.task].class_head else 0,
    )
    if cfg.lexical and not model_args['n_lexical']:
        model_args['n_lexical'] = tag_table_size(meta['lexical_map'])
    if cfg.entity and not model_args['n_entity']:
        model_args['n_entity'] = tag_table_size(meta['entity_map'])
    model = GPT(GPTConfig(**model_args))
    missing, unexpected = model.load_state_dict(base['model'], strict=False)
    foreign = [k for k in missing if not k.startswith(('wle.', 'wee.', 'prompt.', 'class_head.'))] + unexpected
    if foreign:
        raise SystemExit(f"the base checkpoint does not fit the model: {', '.join(foreign)}")
    return model, model_args


def set_trainable(model, cfg, train_tokens, rng):
    if cfg.mode == 'none':  # evaluation only: nothing trains, and the count of trainable parameters says so
        model.requires_grad_(False)
    if cfg.mode == 'ptune':
        model.freeze_for_ptuning(train_lexical=cfg.lexical, train_entity=cfg.entity)
    if cfg.n_prompt and cfg.prompt_init == 'tokens':
        model.init_prompt_from_tokens(rng.choice(train_tokens, size=cfg.n_prompt))


def check_config(cfg):
    """Every option in range, before anything loads (a zero batch or interval would fail mid-run)."""
    choices = dict(
        mode=('full', 'ptune', 'none'),
        task=tuple(TASKS),
        prompt_position=('prefix', 'infix'),
        prompt_init=('random', 'tokens'),
    )
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")
    ranges = (
        (AT_LEAST_ONE, lambda v: v >= 1, '>= 1'),
        (NOT_NEGATIVE, lambda v: v >= 0, '>= 0'),
        (BELOW_ONE, lambda v: 0 <= v < 1, 'in [0, 1)'),
    )
    for keys, in_range, allowed in ranges:
        for key in keys:
            value = getattr(cfg, key)
            if not (math.isfinite(value) and in_range(value)):
                raise SystemExit(f"--{key} must be {allowed}, not {value}")
    check_decoding(cfg)
    if cfg.mode == 'ptune' and cfg.n_prompt == 0:
        raise SystemExit("--mode=ptune trains a soft prompt: give it --n_prompt > 0 (the paper uses 1 to 100)")
    if cfg.mode == 'none' and TASKS[cfg.task].class_head:
        raise SystemExit("--mode=none cannot classify: the class head is new and must be trained")
    if cfg.generate_examples and (not TASKS[cfg.task].generates_replies or cfg.entity_splice):
        raise SystemExit(
            "--generate_examples generates doctor replies: it needs --task=dialogue without --entity_splice"
        )


def load_base(cfg, data_dir, meta):
    """(path, checkpoint) of the base model, refused unless it loads, reads the data folder's
    vocabulary and leaves room in its context beside the soft prompt."""
    path = os.path.join(cfg.init_from, cfg.init_checkpoint)
    try:
        base = load_checkpoint(path, 'cpu')
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(
            f"base model: {error}: give --init_from=<a pretraining run's out_dir> "
            f"(e.g. after `python train.py config/tiny.py`)"
        ) from None
    if base.get('tokenizer'):  # (None: trained on a data folder without a tokenizer file)
        check_tokenizer(base['tokenizer'], data_dir, f"the base checkpoint {path}")
    elif base['model_args']['vocab_size'] != meta['vocab_size']:  # a base older than the tokenizer record
        raise SystemExit(
            f"the base checkpoint {path} has {base['model_args']['vocab_size']} tokens, "
            f"{data_dir}/tokenizer.model {meta['vocab_size']}: "
            f"prepare the data set with the base's tokenizer"
        )
    block_size = base['model_args']['block_size']
    if cfg.n_prompt >= block_size:
        raise SystemExit(
            f"--n_prompt={cfg.n_prompt} leaves no room for text in the base's block_size={block_size}: "
            f"use fewer prompt vectors (the paper uses 1 to 100)"
        )
    return path, base


def refuse_out_dir_of_another_run(cfg, base_path):
    """out_dir gets this run's ckpt.pt (full) or prompt.pt (p-tuning), replacing a previous fine-tuning's of
    the same mode, and its results.jsonl line. Refused: the base's own folder (its ckpt.pt is the pretraining
    run's resume point; sample.py --out_dir=BASE would load a prompt.pt put there), a folder holding a
    pretraining run or an imported model (best.pt, log.jsonl), and one holding the other mode's result (sample.py
    loads prompt.pt before ckpt.pt)."""
    out_dir = cfg.out_dir
    if os.path.realpath(out_dir) == os.path.realpath(os.path.dirname(os.path.abspath(base_path))):
        raise SystemExit(
            f"--out_dir={out_dir} is the base model's own folder ({base_path}): give the fine-tuned "
            f"model another --out_dir"
        )
    other_mode = {'full': 'prompt.pt', 'ptune': 'ckpt.pt'}.get(cfg.mode)
    theirs = [
        name for name in ('best.pt', 'log.jsonl', other_mode) if name and os.path.isfile(os.path.join(out_dir, name))
    ]
    if theirs:
        raise SystemExit(
            f"{out_dir} holds another run ({', '.join(theirs)}), which fine-tuning there would "
            f"replace or hide: give it another --out_dir"
        )


def check_task_data(cfg, task, task_data, data_dir):
    """Refuse what would fail only after training: the task's refusals (no labels to learn, no room for an
    answer), then no whole batch."""
    task.check(task_data, data_dir)
    n_train = len(task_data.inputs['train'])
    if cfg.mode != 'none' and n_train < cfg.batch_size:  # no whole batch: the batch loop would never yield
        raise SystemExit(
            f"--batch_size={cfg.batch_size} is more than the {n_train} training examples in "
            f"{data_dir}: use a smaller batch"
        )


# ----------------------------------------------------------------------------- training


def training_batches(inputs, batch_size, rng):
    """Endless batches, each epoch a new seeded shuffle."""
    while True:
        order = rng.permutation(len(inputs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [inputs[j] for j in order[i : i + batch_size]]


def train(model, task, task_data, cfg):
    """Fine-tune or p-tune on task_data.inputs['train']; keeps and returns the state with the best val loss."""
    n_iters = cfg.max_iters or cfg.epochs * max(len(task_data.inputs['train']) // cfg.batch_size, 1)
    peak_lr = cfg.learning_rate or LR_BY_MODE[cfg.mode]

    def learning_rate(it):  # warm-up, then cosine to a tenth of the peak at the last iteration
        return learning_rate_at(it, peak_lr, peak_lr / 10, cfg.warmup_iters, n_iters)

    device = task_data.device
    optimizer = configure_optimizers(
        model, 'adamw', cfg.weight_decay, peak_lr, (cfg.beta1, cfg.beta2), device_type(device)
    )
    scaler = torch.amp.GradScaler(device_type(device), enabled=task_data.dtype == 'float16')
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = torch.compile(task.loss) if cfg.compile else task.loss
    batches = training_batches(task_data.inputs['train'], cfg.batch_size, np.random.default_rng(cfg.seed))
    best = dict(loss=float('inf'), state=None, iter=0)
    t0 = time.time()
    for it in range(n_iters + 1):
        if it % cfg.eval_interval == 0 or it == n_iters:
            metrics = task.evaluate(model, task_data.inputs['val'][: cfg.max_eval_examples or None], task_data)
            val_loss = task.selection_loss(metrics)
            print(f"iter {it}: val {format_metrics(metrics)}")
            if val_loss < best['loss']:
                best = dict(
                    loss=val_loss, iter=it, state={k: v.detach().clone() for k, v in model.state_dict().items()}
                )
        if it == n_iters:
            break
        with task_data.autocast:
            loss, _, _ = step(model, task.collate(next(batches), task_data.pad_id, device))
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, trainable, cfg.grad_clip, learning_rate(it))
        if it % cfg.log_interval == 0:
            elapsed = time.time() - t0
            print(
                f"iter {it}/{n_iters}: loss {loss.item():.4f}, lr {learning_rate(it):.2e}, "
                f"{elapsed:.0f}s, ETA {elapsed / (it + 1) * (n_iters - it):.0f}s"
            )
    model.load_state_dict(best['state'])
    return best


def format_metrics(metrics):
    return ', '.join(f"{k} {v:.4f}" for k, v in metrics.items())


# ----------------------------------------------------------------------------- main


def save_result(model, model_args, cfg, base_path, base, tokenizer):
    """ckpt.pt (full) or prompt.pt (p-tuning), each with the tokenizer it reads and its base's absolute
    path, so that sample.py run from any folder finds both."""
    base_path = os.path.abspath(base_path)
    if cfg.mode == 'ptune':
        save_adapted(
            os.path.join(cfg.out_dir, 'prompt.pt'), model, model_args, vars(cfg), base_path, base['model'], tokenizer
        )
    elif cfg.mode == 'full':
        save_checkpoint(
            dict(
                model=model.state_dict(), model_args=model_args, config=vars(cfg), base=base_path, tokenizer=tokenizer
            ),
            os.path.join(cfg.out_dir, 'ckpt.pt'),
        )


def main(argv=None):
    t0 = time.time()
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    device, dtype, dtype_reason = resolve_device_and_dtype(cfg.device, cfg.dtype)
    data_dir = data_dir_of(cfg.dataset)
    meta = load_meta(data_dir)
    refuse_out_dir_of_another_run(cfg, os.path.join(cfg.init_from, cfg.init_checkpoint))
    base_path, base = load_base(cfg, data_dir, meta)
    model, model_args = build_model(cfg, base, meta)
    task = TASKS[cfg.task](cfg)
    task_data = load_task_data(task, model_args, meta, data_dir, device, dtype)
    check_task_data(cfg, task, task_data, data_dir)
    with claim_out_dir(cfg.out_dir):  # everything is checked: from here on this run owns out_dir
        refuse_out_dir_of_another_run(cfg, base_path)  # again: out_dir may have changed before we held it
        train_tokens = np.concatenate([ex['tokens'] for ex in task_data.examples['train']])
        set_trainable(model, cfg, train_tokens, np.random.default_rng(cfg.seed))
        model.to(device)
        print(
            f"{cfg.mode}: {model.num_params(trainable_only=True):,} of {model.num_params():,} parameters train; "
            f"{len(task_data.inputs['train'])} train / {len(task_data.inputs['val'])} val / "
            f"{len(task_data.inputs['test'])} test examples; {device}, {dtype} ({dtype_reason})"
        )
        best = train(model, task, task_data, cfg) if cfg.mode != 'none' else dict(loss=None, iter=0)
        tokenizer = tokenizer_record(os.path.join(data_dir, 'tokenizer.model'))  # what the base's record matched
        save_result(model, model_args, cfg, base_path, base, tokenizer)
        test = task.evaluate(model, task_data.inputs['test'], task_data)
        test.update(task.score_generated(model, task_data.examples['test'], task_data))
        result = dict(
            dataset=cfg.dataset,
            mode=cfg.mode,
            task=cfg.task,
            n_prompt=cfg.n_prompt,
            prompt_position=cfg.prompt_position,
            prompt_reparam=cfg.prompt_reparam,
            lexical=cfg.lexical,
            entity=cfg.entity,
            entity_splice=cfg.entity_splice,
            lambda_lm=cfg.lambda_lm,
            init_from=cfg.init_from,
            trainable_params=model.num_params(trainable_only=True),
            total_params=model.num_params(),
            best_val_loss=best['loss'],
            best_iter=best['iter'],
            **{f"test_{k}": v for k, v in test.items()},
            wall_time_s=round(time.time() - t0, 1),
            seed=cfg.seed,
        )
        print(json.dumps(result, ensure_ascii=False))
        with open(os.path.join(cfg.out_dir, 'results.jsonl'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(result, ensure_ascii=False) + '\n')
        return result


if __name__ == '__main__':
    main()
