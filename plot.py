"""
Draw training runs: train and val bits per character against iterations and against training seconds.

    python plot.py out/tiny                          # -> out/tiny/curves.png
    python plot.py out/a out/b --out=compare.png     # several runs on one picture

Reads each run's log.jsonl (train.py writes an eval record per eval_interval: iter, train_s, train_bpc,
val_bpc). Training seconds count the optimisation steps only, not the evaluations, so runs with different
eval settings line up. A run without a tokenizer has no bits/char: its losses (nats per token) are drawn.
"""

import json
import os
import sys


def eval_records(run_dir):
    path = os.path.join(run_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise SystemExit(f"{run_dir}: no log.jsonl (is it a train.py out_dir?)")
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                print(f"{path}:{line_number}: not JSON, skipped", file=sys.stderr)
                continue
            if 'val_loss' in record:
                records.append(record)
    if not records:
        raise SystemExit(f"{path}: no eval record yet (train.py writes one every eval_interval iterations)")
    return records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = next((a.split('=', 1)[1] for a in argv if a.startswith('--out=')), None)
    run_dirs = [a for a in argv if not a.startswith('--')]
    if not run_dirs:
        raise SystemExit("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out=picture.png]")
    out = out or os.path.join(run_dirs[0], 'curves.png')
    import matplotlib

    matplotlib.use('Agg')  # write a file; no screen needed
    import matplotlib.pyplot as plt

    fig, (by_iter, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run_dir in run_dirs:
        records = eval_records(run_dir)
        bpc = all(r.get('val_bpc') is not None for r in records)
        train_key, val_key = ('train_bpc', 'val_bpc') if bpc else ('train_loss', 'val_loss')
        name = os.path.basename(os.path.normpath(run_dir))
        for ax, x_key in ((by_iter, 'iter'), (by_time, 'train_s')):
            points = [r for r in records if x_key in r and r.get(train_key) is not None]
            (line,) = ax.plot([r[x_key] for r in points], [r[val_key] for r in points], label=f'{name} val')
            ax.plot(
                [r[x_key] for r in points],
                [r[train_key] for r in points],
                '--',
                color=line.get_color(),
                label=f'{name} train',
            )
    by_iter.set_xlabel('iteration')
    by_time.set_xlabel('training seconds')
    by_iter.set_ylabel('bits per character' if bpc else 'loss (nats per token)')
    for ax in (by_iter, by_time):
        ax.grid(alpha=0.3)
    by_time.legend()
    fig.savefig(out, dpi=120, bbox_inches='tight')
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
