"""
The papers' tables in miniature, measured on 2 CPU cores:
  Table 3 (CMed-GPT)  does domain pretraining help? pretrained vs randomly initialised, two sizes, and a
                      character 5-gram Kneser-Ney model trained on the same pretraining text
  Table 4 (CMed-GPT)  no adaptation vs full fine-tuning vs p-tuning, COVID-DDC and DXY
  Table 5 (CMed-GPT)  p-tuning with 1, 25, 50, 75, 100 prompt vectors
  Table 6 (CMed-GPT)  p-tuning + lexical / entity embeddings, and entity splicing
  MEDI-BERPT          classification head alone vs multitask (class + lambda * LM) vs label as text
  BioGPT              the soft prompt in front vs between source and target

    python reproduce.py                              # about an hour on 2 CPU cores (55 min measured)
    python reproduce.py --quick                      # every table at toy size in minutes (CI: structure only)
    python reproduce.py --pretrained_dir=out/mine    # use a finished pretraining run whose config matches

Needs data/pretrain, data/covid, data/dxy and data/department (prepare/). Every training run is train.py or
finetune.py in a child process, given its settings as a config file kept beside its log (rerun it with
`python finetune.py that_file.py`). Writes out_dir/results.json: every run's result dict (keyed by its settings
and base weights), the pretraining runs, and the aggregated tables; prints the tables as Markdown. A run whose
result is already in results.json is not run again, and an interrupted pretraining run resumes from its
checkpoint, so a crash loses at most one run.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from checkpoint import fingerprint, load_checkpoint, save_checkpoint
from common import load_meta
from configurator import config_file_values, configure
from model import GPT, GPTConfig
from ngram import EOS, KneserNey
from tables import render
from tasks import build_input, load_split

DEFAULTS = dict(
    quick=False,              # toy sizes and a few iterations: checks that every table fills with finite numbers
    out_dir='out-reproduce',  # --quick writes under out_dir/quick
    seeds=0,                  # fine-tuning seeds per cell; 0 = 3 (quick: 2)
    pretrained_dir='',        # a finished pretraining run to use for whichever size its config matches
    finetune_iters=0,         # 0 = the scale's
)

# Each size is config/tiny.py with overrides. Both full sizes read 256-token windows (config/tiny.py has
# 128): 100 prompt vectors must leave room for the dialogue. Batch 8 x 256 keeps tiny's 2,048 tokens per step.
WINDOW = dict(block_size=256, batch_size=8)
QUICK_PRETRAIN = dict(batch_size=4, max_iters=30, lr_decay_iters=30, warmup_iters=5, eval_interval=15, eval_iters=2,
                      log_interval=10)
SCALES = {
    'full': dict(
        sizes={'tiny': dict(WINDOW), 'mini': dict(n_layer=2, n_head=2, n_embd=128, **WINDOW)},
        seeds=3, finetune_iters=150, max_eval_examples=64, ngram_texts=0),
    'quick': dict(
        sizes={'toy-a': dict(n_layer=1, n_head=2, n_embd=32, **QUICK_PRETRAIN),
               'toy-b': dict(n_layer=2, n_head=2, n_embd=48, **QUICK_PRETRAIN)},
        seeds=2, finetune_iters=6, max_eval_examples=16, ngram_texts=300),
}
SIZE_CONFIG = 'config/tiny.py'
# the paper's 5e-5 is for a 768-wide model and 6 epochs; ours is small and short (3e-4 and 1e-3 reached the
# same COVID val loss in a 200-step trial)
FULL_FINETUNE_LR = 3e-4
N_PROMPT = 25            # p-tuning rows that do not sweep the prompt length
NGRAM_ORDER = 5
# a pretraining run is reusable when its config equals the wanted one on every key but these
PRETRAIN_KEYS_IGNORED = {'out_dir', 'init_from', 'log_interval', 'eval_interval', 'eval_iters',
                         'always_save_checkpoint', 'device', 'compile', 'peak_flops'}


# ----------------------------------------------------------------------------- the tables

def table_specs(size_names):
    """Each table: title, what its cells measure ('lm' or 'class'), rows of (label, run spec), notes."""
    main = size_names[0]
    def cell(**spec):
        return dict(dict(size=main, init='pretrained', dataset='covid', task='dialogue'), **spec)
    ptune = dict(mode='ptune', n_prompt=N_PROMPT)
    pretraining_rows = []
    for size in size_names:
        pretraining_rows += [(f"{size}: pretrained, fine-tuned on COVID", cell(size=size, mode='full')),
                             (f"{size}: random init, trained on COVID only", cell(size=size, mode='full',
                                                                                  init='scratch')),
                             (f"{size}: pretrained, no adaptation", cell(size=size, mode='none'))]
    return [
        dict(title='Table 3 analogue: does domain pretraining help? (COVID-DDC test, doctor replies)',
             kind='lm', rows=pretraining_rows + [(f"character {NGRAM_ORDER}-gram Kneser-Ney, pretraining text",
                                                  dict(ngram=NGRAM_ORDER, size=main))]),
        dict(title='Table 4 analogue: no adaptation vs fine-tuning vs p-tuning', kind='lm',
             rows=[(f"{dataset}: {label}", cell(dataset=dataset, **spec)) for dataset in ('covid', 'dxy')
                   for label, spec in (('no adaptation', dict(mode='none')), ('full fine-tuning', dict(mode='full')),
                                       (f"p-tuning ({N_PROMPT} vectors)", ptune))]),
        dict(title='Table 5 analogue: p-tuning, number of prompt vectors (COVID-DDC)', kind='lm',
             rows=[(f"{n} vectors", cell(mode='ptune', n_prompt=n)) for n in (1, 25, 50, 75, 100)]),
        dict(title=f"Table 6 analogue: entity-aware p-tuning ({N_PROMPT} vectors, COVID-DDC)", kind='lm',
             rows=[('p-tuning', cell(**ptune)), ('+ lexical', cell(**ptune, lexical=True)),
                   ('+ entity', cell(**ptune, entity=True)), ('+ lexical + entity', cell(**ptune, lexical=True,
                                                                                     entity=True)),
                   ('entity splicing', cell(**ptune, entity_splice=True))]),
        dict(title='MEDI-BERPT analogue: classification, full fine-tuning (department QA; DXY disease)',
             kind='class',
             rows=[(f"{dataset}: {label}", cell(dataset=dataset, mode='full', task=task))
                   for dataset in ('department', 'dxy')
                   for label, task in (('classification head alone', 'classify'),
                                       ('multitask (class + 1.0 x LM)', 'multitask'),
                                       ('label as text', 'label_text'))]),
        dict(title=f"BioGPT analogue: where the soft prompt goes (p-tuning, {N_PROMPT} vectors, COVID-DDC)",
             kind='lm', rows=[('in front of the source', cell(**ptune)),
                              ('between source and target', cell(**ptune, prompt_position='infix'))]),
    ]


def is_deterministic(spec):
    """Runs that train nothing give the same numbers for every seed: one evaluation is all there is."""
    return 'ngram' in spec or spec['mode'] == 'none'


# ----------------------------------------------------------------------------- running the scripts

def run_script(script, settings, run_dir, log_name):
    """Run train.py or finetune.py in a child process on `settings`, written as a config file (the
    project's plain-Python config format) beside its log: each run is isolated (its memory is freed when
    it ends, a crash stops only it) and its config file is the exact command to run it again."""
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, f"{log_name}.py")
    with open(config_path, 'w', encoding='utf-8') as f:
        f.write(f"# written by reproduce.py: python {script} {config_path}\n")
        f.write(''.join(f"{key} = {value!r}\n" for key, value in settings.items()))
    log_path = os.path.join(run_dir, f"{log_name}.log")
    with open(log_path, 'a', encoding='utf-8') as log:
        finished = subprocess.run([sys.executable, script, config_path], stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        raise SystemExit(f"{script} failed (exit {finished.returncode}) on {config_path}: see {log_path}")
    return log_path


# ----------------------------------------------------------------------------- pretraining

def pretrain_settings(size_overrides, run_dir):
    """Every train.py key reproduce sets for one size: config/tiny.py's values, then the size's."""
    return dict(config_file_values(SIZE_CONFIG), **size_overrides, out_dir=run_dir)


def same_config_checkpoint(run_dir, wanted):
    """The run's last checkpoint if the run has the wanted settings (finished or not), else None."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        return None
    last = load_checkpoint(path)
    same = all(last['config'].get(k) == v for k, v in wanted.items() if k not in PRETRAIN_KEYS_IGNORED)
    return last if same else None


def pretrain(name, size_overrides, cfg, results):
    """One pretrained model size: reused when a finished run of the same config exists, else trained
    (continuing an interrupted run). Returns facts about it, recorded in results['pretraining']."""
    run_dir = os.path.join(cfg.out_dir, f"pretrain-{name}")
    wanted = pretrain_settings(size_overrides, run_dir)
    for candidate in filter(None, [cfg.pretrained_dir, run_dir]):
        last = same_config_checkpoint(candidate, wanted)
        if last is not None and last['iter_num'] >= wanted['max_iters']:
            print(f"pretraining {name}: reusing the finished run in {candidate}")
            previous = results['pretraining'].get(name, {})
            return describe_pretraining(candidate, previous.get('wall_time_s') if previous.get('dir') == candidate
                                        else None)
    resume = same_config_checkpoint(run_dir, wanted) is not None
    print(f"pretraining {name}: {size_overrides} -> {run_dir} {'(resuming)' if resume else ''}", flush=True)
    t0 = time.time()
    # a scratch run replaces whatever other run reproduce left in its own folder
    run_script('train.py', dict(wanted, init_from='resume' if resume else 'scratch', overwrite=not resume), run_dir,
               'pretrain')
    return describe_pretraining(run_dir, round(time.time() - t0, 1))


def describe_pretraining(run_dir, wall_time_s):
    best = load_checkpoint(os.path.join(run_dir, 'best.pt'))
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        evals = [r for r in map(json.loads, f) if 'val_loss' in r]
    best_eval = min(evals, key=lambda r: r['val_loss'])
    params = GPT(GPTConfig(**best['model_args'])).num_params()
    return dict(dir=run_dir, model_args=best['model_args'], params=params, iters=best['config']['max_iters'],
                learning_rate=best['config']['learning_rate'], best_iter=best['iter_num'],
                val_loss=best_eval['val_loss'], val_bpc=best_eval['val_bpc'], wall_time_s=wall_time_s,
                fingerprint=fingerprint(best['model']))


def scratch_checkpoint(pretrained, seed, cfg):
    """A randomly initialised model of the pretrained one's size (a new init per seed), as a checkpoint
    finetune.py can start from. Returns (init_from, init_checkpoint)."""
    run_dir = os.path.join(cfg.out_dir, f"scratch-{os.path.basename(pretrained['dir'])}")
    name = f"seed{seed}.pt"
    if not os.path.exists(os.path.join(run_dir, name)):
        os.makedirs(run_dir, exist_ok=True)
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**pretrained['model_args']))
        save_checkpoint(dict(model=model.state_dict(), model_args=pretrained['model_args']),
                        os.path.join(run_dir, name))
    return run_dir, name


# ----------------------------------------------------------------------------- the n-gram reference

def ngram_training_texts(max_texts):
    """The pretraining text as the n-gram sees it: train.bin decoded, cut at every special piece. The
    n-gram has no speaker tokens, so each utterance (or book chapter) is one text: it learns how an
    utterance starts and ends, as a test reply is scored from its start to its end marker."""
    from prepare.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(os.path.join('data', 'pretrain', 'tokenizer.model'))
    ids = np.fromfile(os.path.join('data', 'pretrain', 'train.bin'), dtype=np.uint16)
    pieces = np.split(ids, np.flatnonzero(np.isin(ids, tokenizer.special_ids)))
    texts = [tokenizer.decode(p[1:] if p[0] in tokenizer.special_ids else p) for p in pieces if len(p)]
    texts = [t for t in texts if t]
    return texts[:max_texts or None]


def scored_replies(room):
    """The COVID test replies exactly as a GPT without a prompt scores them: (text, whether <eot> is scored),
    each reply cut where the GPT's window cuts it."""
    from prepare.tokenizer import Tokenizer
    data_dir = os.path.join('data', 'covid')
    tokenizer = Tokenizer.load(os.path.join(data_dir, 'tokenizer.model'))
    special = load_meta(data_dir)['special_ids']
    as_dialogue = SimpleNamespace(task='dialogue', entity_splice=False)
    replies = []
    for ex in load_split(data_dir, 'test'):
        targets = build_input(ex, as_dialogue, room, special)['targets']
        scored = targets[targets != -1].tolist()
        ends = scored[-1] == special['eot']
        replies.append((tokenizer.decode(scored[:-1] if ends else scored), ends))
    return replies


def reply_bits(model, text, scores_end):
    """Bits the n-gram spends on a reply: each character given the reply so far, then the end marker
    where the GPT scores its <eot>."""
    chars = list(text) + ([EOS] if scores_end else [])
    return -sum(model.log_prob(text[:i], char) for i, char in enumerate(chars)) / math.log(2)


def ngram_result(order, room, max_texts):
    """The reference row: bits per character of the COVID test replies (per character of reply text, the
    end markers' bits included, as the GPT's bits/char counts its <eot>)."""
    t0 = time.time()
    texts = ngram_training_texts(max_texts)
    model = KneserNey(order).fit(texts)
    replies = scored_replies(room)
    bits = sum(reply_bits(model, text, ends) for text, ends in replies)
    n_chars = sum(len(text) for text, _ in replies)
    return dict(ngram=order, train_texts=len(texts),
                train_chars=sum(map(len, texts)), test_replies=len(replies), test_chars=n_chars,
                test_bpc=bits / n_chars, test_ppl=None, trainable_params=None,
                ngrams=len(model.counts[order]), seen_fraction=seen_fraction(replies, texts),
                wall_time_s=round(time.time() - t0, 1))


def seen_fraction(replies, texts, width=12):
    """The share of the replies' consecutive width-character pieces found verbatim in the training text: how
    much of the test set an n-gram can simply remember."""
    corpus = '\n'.join(texts)
    pieces = [text[i:i + width] for text, _ in replies for i in range(0, len(text) - width + 1, width)]
    return sum(piece in corpus for piece in pieces) / max(len(pieces), 1)


# ----------------------------------------------------------------------------- fine-tuning runs

def finetune_settings(spec, seed, pretrained, scale, cfg):
    """finetune.py's settings for one cell of a table and one seed (out_dir aside: see run_finetune)."""
    settings = {k: v for k, v in spec.items() if k not in ('size', 'init')}
    if spec['init'] == 'scratch':
        init_from, init_checkpoint = scratch_checkpoint(pretrained, seed, cfg)
        learning_rate = pretrained['learning_rate']  # trained from nothing: the pretraining recipe's rate
    else:
        init_from, init_checkpoint = pretrained['dir'], 'best.pt'
        learning_rate = FULL_FINETUNE_LR if spec['mode'] == 'full' else 0.0  # 0: finetune.py's p-tuning rate
    iters = cfg.finetune_iters or scale['finetune_iters']
    settings.update(init_from=init_from, init_checkpoint=init_checkpoint, max_iters=iters,
                    warmup_iters=max(iters // 10, 1), eval_interval=max(iters // 2, 1), learning_rate=learning_rate,
                    max_eval_examples=scale['max_eval_examples'], seed=seed)
    return settings


def run_key(settings, base_fingerprint):
    """What identifies a result: the settings and the weights it started from."""
    return json.dumps(settings, sort_keys=True) + f" @{base_fingerprint[:16]}"


def run_finetune(settings, key, cfg):
    """One fine-tuning run in its own folder (named by its key); returns the result line it wrote."""
    run_dir = os.path.join(cfg.out_dir, 'finetune', hashlib.sha1(key.encode()).hexdigest()[:12])
    log_path = run_script('finetune.py', dict(settings, out_dir=run_dir), run_dir, 'finetune')
    with open(os.path.join(run_dir, 'results.jsonl'), encoding='utf-8') as f:
        result = json.loads(f.read().splitlines()[-1])
    return dict(result, log=log_path)


def run_all(tables, seeds, pretrained, scale, cfg, results):
    """Every (cell, seed) not yet in results['runs'], in table order; saves results after each.
    Returns {row spec as json: [result keys]}."""
    keys_of_spec = {}
    todo = [(spec, seed) for table in tables for _, spec in table['rows']
            for seed in (seeds[:1] if is_deterministic(spec) else seeds)]
    for i, (spec, seed) in enumerate(todo):
        spec_id = json.dumps(spec, sort_keys=True)
        if 'ngram' in spec:  # test replies cut to the window of the size the GPT rows use
            room = pretrained[spec['size']]['model_args']['block_size']
            key = f"ngram order={spec['ngram']} texts={scale['ngram_texts']} room={room}"
        else:
            settings = finetune_settings(spec, seed, pretrained[spec['size']], scale, cfg)
            key = run_key(settings, pretrained[spec['size']]['fingerprint'])
        if key in keys_of_spec.setdefault(spec_id, []):
            continue  # the same cell in two tables
        keys_of_spec[spec_id].append(key)
        if key in results['runs']:
            continue
        t0 = time.time()
        if 'ngram' in spec:
            result = ngram_result(spec['ngram'], room, scale['ngram_texts'])
        else:
            result = dict(run_finetune(settings, key, cfg), spec=spec)
        results['runs'][key] = result
        save_results(results, cfg)
        print(f"[{i + 1}/{len(todo)}] {describe(spec)} seed {seed}: {summary_line(result)} "
              f"({time.time() - t0:.0f}s)", flush=True)
    return keys_of_spec


def describe(spec):
    return ' '.join(f"{k}={v}" for k, v in spec.items() if v not in (False, 0, 'prefix'))


def summary_line(result):
    parts = [f"{name} {result[key]:.4g}" for name, key in (('ppl', 'test_ppl'), ('bpc', 'test_bpc'),
             ('acc', 'test_acc'), ('f1', 'test_f1')) if result.get(key) is not None]
    return ', '.join(parts)


# ----------------------------------------------------------------------------- results file

def results_path(cfg):
    return os.path.join(cfg.out_dir, 'results.json')


def load_results(cfg):
    if not os.path.exists(results_path(cfg)):
        return dict(runs={}, pretraining={})
    with open(results_path(cfg), encoding='utf-8') as f:
        return json.load(f)


def save_results(results, cfg):
    """Atomic: an interrupted write leaves the previous results."""
    temp_path = results_path(cfg) + '.tmp'
    with open(temp_path, 'w', encoding='utf-8') as f:
        json.dump(results, f, ensure_ascii=False, indent=1)
    os.replace(temp_path, results_path(cfg))


def main(argv=None):
    t0 = time.time()
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    scale = SCALES['quick' if cfg.quick else 'full']
    if cfg.quick:  # toy results apart from the real ones
        cfg.out_dir = os.path.join(cfg.out_dir, 'quick')
    seeds = [1337 + i for i in range(cfg.seeds or scale['seeds'])]
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = load_results(cfg)
    results['config'] = dict(vars(cfg), scale=scale, seeds=seeds)
    pretrained = {}
    for name, size_overrides in scale['sizes'].items():
        pretrained[name] = pretrain(name, size_overrides, cfg, results)
        results['pretraining'][name] = pretrained[name]
        save_results(results, cfg)
    tables = table_specs(list(scale['sizes']))
    keys_of_spec = run_all(tables, seeds, pretrained, scale, cfg, results)
    results['pretraining'] = pretrained  # only this run's sizes
    markdown, results['tables'], bad = render(tables, keys_of_spec, results)
    results['markdown'] = markdown
    save_results(results, cfg)
    print('\n' + markdown)
    print(f"\nresults in {results_path(cfg)}; {(time.time() - t0) / 60:.1f} min")
    if bad:
        raise SystemExit(f"missing or non-finite numbers: {bad}")


if __name__ == '__main__':
    main()
