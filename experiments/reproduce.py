"""
The papers' tables in miniature, measured on 2 CPU cores (tables.py says what each row runs):
  Table 3 (CMed-GPT)  general vs medical pretraining: the same model pretrained on general news text and on as
                      many characters of medical text, each evaluated on COVID-DDC and IMCS-21 without
                      adaptation and after fine-tuning; all the medical text, random init and (COVID) a
                      character 5-gram Kneser-Ney model as references
  Table 4 (CMed-GPT)  no adaptation vs full fine-tuning vs p-tuning, COVID-DDC, IMCS-21 and DXY
  Table 5 (CMed-GPT)  p-tuning with 1 to 100 prompt vectors, COVID-DDC and IMCS-21
  Table 6 (CMed-GPT)  p-tuning + lexical / entity embeddings, and entity splicing, COVID-DDC and IMCS-21
  new                 IMCS-21 entity ids from its gold symptom labels vs from lexicon matching
  new                 BLEU-1/2/4, Distinct-1/2 and entity F1 of sampled replies, COVID-DDC and IMCS-21
  MEDI-BERPT          classification head alone vs multitask (class + lambda * LM) vs label as text,
                      department QA, DXY and IMCS-21
  BioGPT              the soft prompt in front vs between source and target

    python -m experiments.reproduce                             # about an hour on 2 CPU cores
    python -m experiments.reproduce --quick                     # every table at toy size in minutes (CI: structure)
    python -m experiments.reproduce --pretrained_dir=out/mine   # use a finished pretraining run whose config matches

Needs `make data` (data/pretrain, general, medical_equal, covid, imcs, imcs_lexicon, dxy, department).
Every training run is train.py or finetune.py in a child process, given its settings as a config file kept
beside its log (rerun it with `python finetune.py that_file.py`); --jobs of them run at once (default: one per
core, one thread each). Writes out_dir/results.json: every run's result dict (keyed by its settings and base
weights), the pretraining runs, and the aggregated tables; prints the tables as Markdown. A run whose result
is already in results.json is not run again, and an interrupted pretraining run resumes from its checkpoint,
so a crash loses at most the runs under way.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from types import SimpleNamespace

import torch

from checkpoint import fingerprint, load_checkpoint, save_checkpoint
from common import load_meta
from configurator import config_file_values, configure
from experiments.ngram_reference import ngram_result
from experiments.tables import DECODING, DIALOGUE_SETS, is_deterministic, render, table_specs
from model import GPT, GPTConfig
from tasks import TASKS

# fmt: off
DEFAULTS = dict(
    quick=False,              # toy sizes and a few iterations: checks that every table fills with finite numbers
    out_dir='out-reproduce',  # --quick writes under out_dir/quick
    seeds=0,                  # fine-tuning seeds per cell; 0 = the scale's (2)
    pretrained_dir='',        # a finished pretraining run to use for whichever base its config matches
    finetune_iters=0,         # 0 = the scale's
    jobs=0,                   # runs at once, each on cores / jobs threads; 0 = one per core (see run_all)
    tables='',                # only the tables of these kinds, comma-separated: lm, class, generation ('' = all)
)
# fmt: on

# Every base is config/tiny.py with these overrides, pretrained on its own data set (BASES). They read 256-token
# windows (config/tiny.py has 128): 100 prompt vectors must leave room for the dialogue. Batch 8 x 256 keeps
# tiny's 2,048 tokens per step, and its recipe and 1,600 steps (3.3M tokens, about 3 passes) stay as they are.
BASES = {'medical': 'pretrain', 'general': 'general', 'medical_equal': 'medical_equal'}
SCALES = {
    'full': dict(
        size=dict(block_size=256, batch_size=8),
        seeds=2,
        finetune_iters=120,
        max_eval_examples=64,
        ngram_texts=0,
        generate_examples=100,
        max_new_tokens=48,
        prompt_lengths={'covid': (1, 25, 50, 75, 100), 'imcs': (1, 25, 100)},
    ),
    'quick': dict(
        size=dict(
            n_layer=1,
            n_head=2,
            n_embd=32,
            batch_size=4,
            max_iters=30,
            lr_decay_iters=30,
            warmup_iters=5,
            eval_interval=15,
            eval_iters=2,
            log_interval=10,
        ),
        seeds=2,
        finetune_iters=6,
        max_eval_examples=16,
        ngram_texts=300,
        generate_examples=3,
        max_new_tokens=12,
        prompt_lengths={'covid': (1, 25, 100), 'imcs': (1, 25)},
    ),
}
SIZE_CONFIG = 'config/tiny.py'
# the paper's 5e-5 is for a 768-wide model and 6 epochs; ours is small and short (3e-4 and 1e-3 reached the
# same COVID val loss in a 200-step trial)
FULL_FINETUNE_LR = 3e-4
# a pretraining run is reusable when its config equals the wanted one on every key but these
PRETRAIN_KEYS_IGNORED = {
    'out_dir',
    'init_from',
    'log_interval',
    'eval_interval',
    'eval_iters',
    'always_save_checkpoint',
    'device',
    'compile',
    'peak_flops',
}


# ----------------------------------------------------------------------------- running the scripts


def run_script(script, settings, run_dir, log_name, threads):
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
        finished = subprocess.run(
            [sys.executable, script, config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )
    if finished.returncode != 0:
        raise SystemExit(f"{script} failed (exit {finished.returncode}) on {config_path}: see {log_path}")
    return log_path


# ----------------------------------------------------------------------------- pretraining


def pretrain_settings(size_overrides, dataset, run_dir):
    """Every train.py key reproduce sets for one base: config/tiny.py's values, then the size's and its data."""
    return dict(config_file_values(SIZE_CONFIG), **size_overrides, dataset=dataset, out_dir=run_dir)


def same_config_checkpoint(run_dir, wanted):
    """The run's last checkpoint if the run has the wanted settings (finished or not), else None."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        return None
    last = load_checkpoint(path)
    same = all(last['config'].get(k) == v for k, v in wanted.items() if k not in PRETRAIN_KEYS_IGNORED)
    return last if same else None


def pretrain(name, size_overrides, cfg, results):
    """One pretrained base: reused when a finished run of the same config exists, else trained
    (continuing an interrupted run). Returns facts about it, recorded in results['pretraining']."""
    run_dir = os.path.join(cfg.out_dir, f"pretrain-{name}")
    wanted = pretrain_settings(size_overrides, BASES[name], run_dir)
    for candidate in filter(None, [cfg.pretrained_dir, run_dir]):
        last = same_config_checkpoint(candidate, wanted)
        if last is not None and last['iter_num'] >= wanted['max_iters']:
            print(f"pretraining {name}: reusing the finished run in {candidate}\n", end='', flush=True)
            previous = results['pretraining'].get(name, {})
            return describe_pretraining(
                candidate, previous.get('wall_time_s') if previous.get('dir') == candidate else None
            )
    resume = same_config_checkpoint(run_dir, wanted) is not None
    # one write per line: the bases are pretrained on parallel threads
    print(
        f"pretraining {name} on data/{BASES[name]}: {size_overrides} -> {run_dir} {'(resuming)' if resume else ''}\n",
        end='',
        flush=True,
    )
    t0 = time.time()
    # a scratch run replaces whatever other run reproduce left in its own folder
    run_script(
        'train.py',
        dict(wanted, init_from='resume' if resume else 'scratch', overwrite=not resume),
        run_dir,
        'pretrain',
        cfg.threads,
    )
    return describe_pretraining(run_dir, round(time.time() - t0, 1))


def describe_pretraining(run_dir, wall_time_s):
    best = load_checkpoint(os.path.join(run_dir, 'best.pt'))
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        evals = [r for r in map(json.loads, f) if 'val_loss' in r]
    best_eval = min(evals, key=lambda r: r['val_loss'])
    params = GPT(GPTConfig(**best['model_args'])).num_params()
    dataset = best['config']['dataset']
    train_chars = load_meta(os.path.join('data', dataset))['splits']['train']['input_chars']
    return dict(
        dir=run_dir,
        dataset=dataset,
        train_chars=train_chars,
        model_args=best['model_args'],
        params=params,
        iters=best['config']['max_iters'],
        learning_rate=best['config']['learning_rate'],
        best_iter=best['iter_num'],
        val_loss=best_eval['val_loss'],
        val_bpc=best_eval['val_bpc'],
        wall_time_s=wall_time_s,
        fingerprint=fingerprint(best['model']),
    )


def scratch_checkpoint(pretrained, seed, cfg):
    """A randomly initialised model of the pretrained one's size (a new init per seed), as a checkpoint
    finetune.py can start from. Returns (init_from, init_checkpoint)."""
    run_dir = os.path.join(cfg.out_dir, f"scratch-{os.path.basename(pretrained['dir'])}")
    name = f"seed{seed}.pt"
    if not os.path.exists(os.path.join(run_dir, name)):
        os.makedirs(run_dir, exist_ok=True)
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**pretrained['model_args']))
        save_checkpoint(
            dict(model=model.state_dict(), model_args=pretrained['model_args']), os.path.join(run_dir, name)
        )
    return run_dir, name


# ----------------------------------------------------------------------------- fine-tuning runs


def finetune_settings(spec, seed, pretrained, scale, cfg):
    """finetune.py's settings for one cell of a table and one seed (out_dir aside: see run_finetune)."""
    settings = {k: v for k, v in spec.items() if k not in ('base', 'init')}
    if spec['init'] == 'scratch':
        init_from, init_checkpoint = scratch_checkpoint(pretrained, seed, cfg)
        learning_rate = pretrained['learning_rate']  # trained from nothing: the pretraining recipe's rate
    else:
        init_from, init_checkpoint = pretrained['dir'], 'best.pt'
        learning_rate = FULL_FINETUNE_LR if spec['mode'] == 'full' else 0.0  # 0: finetune.py's p-tuning rate
    iters = cfg.finetune_iters or scale['finetune_iters']
    settings.update(
        init_from=init_from,
        init_checkpoint=init_checkpoint,
        max_iters=iters,
        warmup_iters=max(iters // 10, 1),
        eval_interval=max(iters // 2, 1),
        learning_rate=learning_rate,
        max_eval_examples=scale['max_eval_examples'],
        seed=seed,
    )
    if TASKS[spec['task']].generates_replies and spec['dataset'] in DIALOGUE_SETS and not spec.get('entity_splice'):
        settings.update(
            generate_examples=scale['generate_examples'], max_new_tokens=scale['max_new_tokens'], **DECODING
        )
    return settings


def run_key(settings, base_fingerprint):
    """What identifies a result: the settings and the weights it started from."""
    return json.dumps(settings, sort_keys=True) + f" @{base_fingerprint[:16]}"


def run_finetune(settings, key, cfg):
    """One fine-tuning run in its own folder (named by its key); returns the result line it wrote."""
    run_dir = os.path.join(cfg.out_dir, 'finetune', hashlib.sha1(key.encode()).hexdigest()[:12])
    log_path = run_script('finetune.py', dict(settings, out_dir=run_dir), run_dir, 'finetune', cfg.threads)
    with open(os.path.join(run_dir, 'results.jsonl'), encoding='utf-8') as f:
        result = json.loads(f.read().splitlines()[-1])
    return dict(result, log=log_path)


def run_all(tables, seeds, scale, cfg, results, pool):
    """Pretrains every base and runs every (cell, seed) not yet in results['runs'], cfg.jobs at a time; a base's
    cells start as soon as it is pretrained, and results are saved as each run ends.
    Returns ({base: facts}, {row spec as json: [result keys]}).

    Small models use two cores poorly: two runs of one thread each finish sooner than two runs one after the
    other on two threads (measured: docs/papers.md). A run's numbers depend on its thread count in the last digits
    (the order of a matmul's sums), so the same --jobs on the same machine gives the same results."""
    cells = [
        (spec, seed)
        for table in tables
        for _, spec in table['rows']
        for seed in (seeds[:1] if is_deterministic(spec) else seeds)
    ]
    keys_of_spec = {json.dumps(spec, sort_keys=True): [] for spec, _ in cells}
    pretrained, todo, done, t0 = {}, {}, 0, time.time()
    needed = {spec.get('base', 'medical') for spec, _ in cells}  # only the bases the chosen tables use
    running = {pool.submit(pretrain, name, scale['size'], cfg, results): name for name in BASES if name in needed}
    while running:
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            name_or_key = running.pop(future)
            if name_or_key in BASES:  # a base is ready: its cells can start
                pretrained[name_or_key] = results['pretraining'][name_or_key] = future.result()
                save_results(results, cfg)
                for spec, seed in cells:
                    if spec.get('base', 'medical') != name_or_key:  # (the n-gram's test replies: medical's window)
                        continue
                    key, job = cell_run(spec, seed, pretrained[name_or_key], scale, cfg)
                    keys = keys_of_spec[json.dumps(spec, sort_keys=True)]
                    if key not in keys:  # (the same cell may be in two tables)
                        keys.append(key)
                    if key not in results['runs'] and key not in todo:
                        todo[key] = (spec, seed)
                        running[pool.submit(run_cell, key, spec, job, scale, cfg)] = key
                continue
            results['runs'][name_or_key] = future.result()  # a failed run raises here and stops reproduce
            save_results(results, cfg)
            done += 1
            spec, seed = todo[name_or_key]
            elapsed = time.time() - t0
            print(
                f"[{done}/{len(todo)} so far] {describe(spec)} seed {seed}: "
                f"{summary_line(results['runs'][name_or_key])} ({elapsed / 60:.1f} min)",
                flush=True,
            )
    return pretrained, keys_of_spec


def cell_run(spec, seed, base, scale, cfg):
    """(result key, what run_cell needs) of one cell and seed on its pretrained base."""
    if 'ngram' in spec:  # test replies cut to the window the GPT rows use
        room = base['model_args']['block_size']
        return f"ngram order={spec['ngram']} texts={scale['ngram_texts']} room={room}", room
    settings = finetune_settings(spec, seed, base, scale, cfg)
    return run_key(settings, base['fingerprint']), settings


def run_cell(key, spec, job, scale, cfg):
    if 'ngram' in spec:
        return ngram_result(spec['ngram'], job, scale['ngram_texts'])
    return dict(run_finetune(job, key, cfg), spec=spec)


def describe(spec):
    return ' '.join(f"{k}={v}" for k, v in spec.items() if v not in (False, 0, 'prefix'))


def summary_line(result):
    parts = [
        f"{name} {result[key]:.4g}"
        for name, key in (
            ('ppl', 'test_ppl'),
            ('bpc', 'test_bpc'),
            ('acc', 'test_acc'),
            ('f1', 'test_f1'),
            ('bleu1', 'test_bleu1'),
        )
        if result.get(key) is not None
    ]
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
    cores = len(os.sched_getaffinity(0))
    cfg.jobs = cfg.jobs or cores
    cfg.threads = max(cores // cfg.jobs, 1)
    print(f"{cfg.jobs} run(s) at a time, {cfg.threads} thread(s) each")
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = load_results(cfg)
    results['config'] = dict(vars(cfg), scale=scale, seeds=seeds)
    tables = table_specs(scale['prompt_lengths'])
    kinds = cfg.tables.split(',') if cfg.tables else [table['kind'] for table in tables]
    unknown = set(kinds) - {table['kind'] for table in tables}
    if unknown:
        raise SystemExit(f"--tables: unknown kind(s) {sorted(unknown)}; the kinds are lm, class and generation")
    tables = [table for table in tables if table['kind'] in kinds]
    # a failed run stops reproduce: the runs not yet started are cancelled, the running ones end first
    with ThreadPoolExecutor(cfg.jobs) as pool:
        try:
            pretrained, keys_of_spec = run_all(tables, seeds, scale, cfg, results, pool)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    results['pretraining'] = pretrained  # only this run's bases
    markdown, results['tables'], bad = render(tables, keys_of_spec, results)
    results['markdown'] = markdown
    save_results(results, cfg)
    print('\n' + markdown)
    print(f"\nresults in {results_path(cfg)}; {(time.time() - t0) / 60:.1f} min")
    if bad:
        raise SystemExit(f"missing or non-finite numbers: {bad}")


if __name__ == '__main__':
    main()
