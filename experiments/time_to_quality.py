"""
Time to quality: how many seconds of training each recipe needs to reach a validation bits/char target on
this machine, and how that compares with the reference recipe (nanoGPT's for small models).

    python -m experiments.time_to_quality                                # every recipe below, one after another
    python -m experiments.time_to_quality --recipes=reference,muon --time_cap=300 --target=4.0
    python -m experiments.time_to_quality --train=False                  # the report and COVID scores again

Each recipe is train.py on config/tiny.py plus a few `--key=value` overrides (a recipe changes one lever of the
reference, or combines the ones that helped). A run is stopped at the time cap; its eval lines in log.jsonl give
(training seconds, tokens, val bits/char): the seconds count training steps only, not the evaluations this
benchmark adds. Val bits/char is train.py's estimate on eval_iters fixed windows of the validation split; bits
per character, not per token, so recipes with different tokenizers compare honestly.

The n-gram line is ngram.py's character Kneser-Ney model, best of --ngram_orders (3 to 8), trained on data/pretrain's
training text and scored on its validation text (both decoded from the bins and cut at every special piece).
Then each final model of a recipe that reads data/pretrain's tokenizer is scored on COVID-DDC's test replies
(`eval.py --dataset=covid --split=test`, in the recipes' dtype), beside the best n-gram on exactly the text the
models score: each reply cut where a config/tiny.py window cuts it (experiments/ngram_reference.py).
Writes out/ttq/results.json (the curves) and out/ttq/curves.png. Run it on an otherwise idle machine: the
seconds are wall-clock seconds.
"""

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from configurator import config_file_values, configure

DEFAULTS = dict(
    recipes='',  # comma-separated names from RECIPES ('' = all, in order)
    target=0.0,  # bits/char to reach; 0 = the n-gram's
    time_cap=600,  # seconds of training per recipe at most
    eval_interval=50,  # iterations between two points of a curve
    eval_iters=40,  # 40 x 16 windows of 128 tokens: about the size of the validation split
    out='out/ttq',
    ngram_orders='3,4,5,6,7,8',
    dtype='float32',  # every recipe in float32, as on a CPU without bf16 matmul units (a recipe may differ)
    extra='',  # train.py overrides added to every recipe, space-separated (e.g. '--device=cuda')
    train=True,  # False: no training, only the report, the plot and the COVID scores of the runs in out/
    covid=True,  # score the final models and the n-gram on COVID-DDC's test replies
)

# nanoGPT's recipe for small models (its shakespeare_char config): AdamW, lr 1e-3, beta2 0.99, warm-up then
# cosine to a tenth of the peak, no dropout; on config/tiny.py's model and data/pretrain.
REFERENCE = [
    '--dataset=pretrain',
    '--optimizer=adamw',
    '--learning_rate=1e-3',
    '--min_lr=1e-4',
    '--beta1=0.9',
    '--beta2=0.99',
    '--weight_decay=0.1',
    '--grad_clip=1.0',
    '--lr_schedule=cosine',
    '--warmup_iters=100',
    '--dropout=0.0',
]
MUON = ['--optimizer=muon', '--muon_lr=0.02', '--learning_rate=3e-3', '--min_lr=3e-4']
RECIPES = {  # each changes one lever of the reference, or adds one to the best so far; later keys win
    'reference': REFERENCE,
    'muon': REFERENCE + MUON,
    'muon+wsd': REFERENCE + MUON + ['--lr_schedule=wsd', '--min_lr=0'],
    'muon+bpe4000': REFERENCE + MUON + ['--dataset=pretrain_v4000'],
    'muon+chars': REFERENCE + MUON + ['--dataset=pretrain_char'],
    'muon+6x256': REFERENCE + MUON + ['--n_layer=6', '--n_head=4', '--n_embd=256'],
    'muon+block256': REFERENCE + MUON + ['--block_size=256', '--batch_size=8'],  # the same tokens per step
    'muon+batch8': REFERENCE + MUON + ['--batch_size=8'],
    'muon+batch32': REFERENCE + MUON + ['--batch_size=32'],
    'muon+lr0.01': REFERENCE + MUON + ['--muon_lr=0.01', '--learning_rate=1.5e-3', '--min_lr=1.5e-4'],  # half
    'muon+lr0.04': REFERENCE + MUON + ['--muon_lr=0.04', '--learning_rate=6e-3', '--min_lr=6e-4'],  # twice
    'muon+compile': REFERENCE + MUON + ['--compile'],
    'muon+bf16': REFERENCE + MUON + ['--dtype=bfloat16'],
    'tiny': [f"--max_iters={config_file_values('config/tiny.py')['max_iters']}"],  # what make demo trains, as is
}
CALIBRATION_ITERS = 30  # a short run first measures each recipe's speed, so that its schedule ends at the cap


def cached_scores(path, key, score, orders):
    """{order: bits/char} of score(order) for each order, kept in the JSON file at path and computed again only when
    key (what the scores depend on) changes."""
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get('key') == key:
            return {int(order): bpc for order, bpc in cached['all'].items()}
    scores = {}
    for order in orders:
        t0 = time.time()
        scores[order] = score(order)
        print(f"n-gram order {order}: {scores[order]:.4f} bits/char ({time.time() - t0:.0f} s)", flush=True)
    with open(path, 'w') as f:
        json.dump({'key': key, 'all': scores}, f)
    return scores


def ngram_bpc(orders, out):
    """(best bits/char, order) of the character n-gram on data/pretrain's validation text (cached)."""
    from experiments.ngram import KneserNey
    from experiments.ngram_reference import ngram_training_texts

    key = {'orders': orders, 'meta_mtime': os.path.getmtime(os.path.join('data', 'pretrain', 'meta.json'))}
    texts = {}

    def score(order):  # each utterance or chapter one text: the n-gram has no speaker pieces
        if not texts:
            texts.update(train=ngram_training_texts(0), val=ngram_training_texts(0, 'val'))
        return KneserNey(order).fit(texts['train']).bits_per_char(texts['val'])[0]

    scores = cached_scores(os.path.join(out, 'ngram.json'), key, score, orders)
    order = min(scores, key=scores.get)
    return scores[order], order


def iterations_in(seconds, overrides, cfg, out_dir):
    """How many iterations of this recipe fit in `seconds` here: the speed of a short run's last steps (the first
    ones include start-up and compilation)."""
    subprocess.run(
        [
            sys.executable,
            'train.py',
            'config/tiny.py',
            f'--out_dir={out_dir}',
            '--overwrite',
            f'--dtype={cfg.dtype}',
            *overrides,
            f'--max_iters={CALIBRATION_ITERS}',
            '--eval_iters=1',
            '--log_interval=1',
            f'--eval_interval={CALIBRATION_ITERS}',
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    steps = [r['train_s'] for r in records if 'loss' in r]  # training seconds after each step
    tokens_per_iter = records[-1]['tokens'] / CALIBRATION_ITERS
    seconds_per_iter = (steps[-1] - steps[-11]) / 10
    print(f"calibration: {tokens_per_iter / seconds_per_iter:,.0f} tokens/s", flush=True)
    return int(seconds / seconds_per_iter)


def run_recipe(name, overrides, cfg):
    """Train one recipe until the time cap; returns its curve [(train seconds, tokens, val bits/char)]. Unless the
    recipe sets max_iters, its schedule is fitted to the cap (its speed measured first)."""
    out_dir = os.path.join(cfg.out, name)
    log_path = os.path.join(out_dir, 'log.jsonl')
    print(f"\n== {name}", flush=True)
    if not any(o.startswith('--max_iters=') for o in overrides):
        iters = iterations_in(0.98 * cfg.time_cap, overrides, cfg, out_dir)
        overrides = overrides + [f'--max_iters={iters}', f'--lr_decay_iters={iters}']
    if os.path.exists(log_path):  # the calibration's: the run below starts its own
        os.remove(log_path)
    command = [
        sys.executable,
        'train.py',
        'config/tiny.py',
        f'--out_dir={out_dir}',
        '--overwrite',
        f'--eval_interval={cfg.eval_interval}',
        f'--eval_iters={cfg.eval_iters}',
        f'--dtype={cfg.dtype}',
        *overrides,
    ]
    print(' '.join(command[1:]), flush=True)
    process = subprocess.Popen(command)
    curve, offset, pending = [], 0, ''
    while True:
        finished = process.poll() is not None
        if os.path.exists(log_path):
            with open(log_path) as f:  # read only what was appended since the last look
                f.seek(offset)
                pending += f.read()
                offset = f.tell()
            *lines, pending = pending.split('\n')  # the last piece may be a line still being written
            for line in filter(None, lines):
                record = json.loads(line)
                if 'val_bpc' in record:
                    curve.append((record['train_s'], record['tokens'], record['val_bpc']))
        if finished or (curve and curve[-1][0] >= 1.05 * cfg.time_cap):  # a schedule fitted to the cap ends first
            break
        time.sleep(2)
    if not finished:
        process.terminate()
        process.wait()
    elif process.returncode:
        raise SystemExit(f"recipe {name} failed (exit {process.returncode}): see the output above")
    return curve


def time_to(curve, target):
    """Training seconds at which the curve first reaches the target (linear between two evals), or None."""
    for (t0, _, b0), (t1, _, b1) in zip([(0, 0, math.inf)] + curve[:-1], curve):
        if b1 <= target:
            return t1 if not math.isfinite(b0) else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def plot(curves, ngram, ngram_order, target, path):
    import matplotlib

    matplotlib.use('Agg')  # no screen needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[2] for c in curve], label=name)
    ax.axhline(ngram, color='k', linestyle='--', label=f'{ngram_order}-gram Kneser-Ney ({ngram:.3f})')
    if target != ngram:
        ax.axhline(target, color='gray', linestyle=':', label=f'target ({target:.3f})')
    ax.set_xlabel('training seconds')
    ax.set_ylabel('val bits per character')
    ax.set_ylim(top=min(ax.get_ylim()[1], ngram + 2))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches='tight')


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    names = cfg.recipes.split(',') if cfg.recipes else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {list(RECIPES)}")
    os.makedirs(cfg.out, exist_ok=True)
    ngram, ngram_order = ngram_bpc([int(o) for o in cfg.ngram_orders.split(',')], cfg.out)
    target = cfg.target or ngram
    results_path = os.path.join(cfg.out, 'results.json')
    results = {}
    if os.path.exists(results_path):  # earlier recipes' curves stay: recipes can be run a few at a time
        with open(results_path) as f:
            results = json.load(f)
    for name in names if cfg.train else ():
        overrides = RECIPES[name] + cfg.extra.split()
        curve = run_recipe(name, overrides, cfg)
        results[name] = {
            'overrides': overrides,
            'dtype': cfg.dtype,
            'time_cap': cfg.time_cap,
            'curve': curve,
            'load_average': os.getloadavg()[0],
        }
        with open(results_path, 'w') as f:
            json.dump(results, f, indent=1)
    curves = {name: results[name]['curve'] for name in results}
    report(curves, target, ngram, ngram_order)
    plot(curves, ngram, ngram_order, target, os.path.join(cfg.out, 'curves.png'))
    print(f"curves: {os.path.join(cfg.out, 'curves.png')}")
    if cfg.covid:
        covid_report(results, cfg)
        with open(results_path, 'w') as f:
            json.dump(results, f, indent=1)


def recipe_dataset(overrides):
    """The data set a recipe trains on: its last --dataset= override, else config/tiny.py's."""
    datasets = [o.split('=', 1)[1] for o in overrides if o.startswith('--dataset=')]
    return (datasets or [config_file_values('config/tiny.py')['dataset']])[-1]


def covid_report(results, cfg):
    """COVID-DDC test replies, bits/char: each run on data/pretrain's tokenizer (eval.py on its final model) and
    the best n-gram on the same replies, cut where a config/tiny.py window cuts them (cached in out/)."""
    from experiments.ngram_reference import ngram_result

    room = config_file_values('config/tiny.py')['block_size']
    orders = [int(o) for o in cfg.ngram_orders.split(',')]
    key = {
        'orders': orders,
        'room': room,
        'meta_mtime': [os.path.getmtime(f'data/{d}/meta.json') for d in ('pretrain', 'covid')],
    }

    def score(order):
        return ngram_result(order, room, 0)['test_bpc']

    scores = cached_scores(os.path.join(cfg.out, 'ngram_covid.json'), key, score, orders)
    order, bpc = min(scores.items(), key=lambda item: item[1])
    print(f"\nCOVID-DDC test replies: the best n-gram ({order}-gram) {bpc:.4f} bits/char")
    for name, result in results.items():
        if recipe_dataset(result['overrides']) != 'pretrain':
            continue  # another tokenizer than data/covid's: its ids are not the set's
        command = [sys.executable, 'eval.py', f'--out_dir={os.path.join(cfg.out, name)}', '--dataset=covid']
        output = subprocess.run(
            [*command, '--split=test', f"--dtype={result['dtype']}"], check=True, capture_output=True, text=True
        ).stdout
        score = json.loads(next(line for line in output.splitlines() if line.startswith('{')))
        result['covid_test_bpc'] = score['bpc']
        print(f"{name:<22} {score['bpc']:.4f} bits/char ({score['examples']} replies)")


def report(curves, target, ngram, ngram_order):
    """The table: time to the target; and, as the target may be out of every recipe's reach, the time to the
    reference's final bits/char (equal quality), with the speed-up over the reference at that quality."""
    print(f"\ntarget {target:.4f} bits/char; the best n-gram ({ngram_order}-gram) scores {ngram:.4f}")
    reference = curves.get('reference')
    equal = reference[-1][2] if reference else None
    print(
        f"{'recipe':<22} {'to target':>10} {'best bpc':>9} {'at s':>6}"
        + (f" {f'to {equal:.3f}':>9} {'speed-up':>9}" if equal else '')
    )
    for name, curve in curves.items():
        seconds = time_to(curve, target)
        best = min(curve, key=lambda point: point[2])
        line = f"{name:<22} {f'{seconds:.0f} s' if seconds else '-':>10} {best[2]:>9.4f} {best[0]:>6.0f}"
        if equal:
            to_equal = time_to(curve, equal)
            speedup = f"{time_to(reference, equal) / to_equal:.2f}x" if to_equal else '-'
            line += f" {f'{to_equal:.0f} s' if to_equal else '-':>9} {speedup:>9}"
        print(line)


if __name__ == '__main__':
    main()
