"""plot.py draws runs' log.jsonl: the curves hold the logged numbers, and bad run folders are refused by name."""

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest

matplotlib.use('Agg')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plot  # noqa: E402


def write_log(run_dir, evals, partial_last_line=False):
    """A log.jsonl as train.py writes it: step records between eval records."""
    run_dir.mkdir()
    with open(run_dir / 'log.jsonl', 'w') as f:
        for it, train_s, train_bpc, val_bpc in evals:
            record = dict(iter=it, train_loss=train_bpc * 1.5, val_loss=val_bpc * 1.5, train_s=train_s)
            record.update(train_bpc=train_bpc, val_bpc=val_bpc)
            f.write(json.dumps(record) + '\n')
            f.write(json.dumps(dict(iter=it, loss=2.0, lr=1e-3, train_s=train_s + 0.5)) + '\n')
        if partial_last_line:
            f.write('{"iter": 30, "val_lo')  # a run killed mid-write


def test_curves_hold_each_runs_logged_bits_per_char_by_iteration_and_by_seconds(tmp_path, capsys):
    write_log(tmp_path / 'a', [(0, 0.0, 7.0, 7.1), (10, 4.0, 5.0, 5.2), (20, 8.0, 4.0, 4.3)], partial_last_line=True)
    write_log(tmp_path / 'b', [(0, 0.0, 7.0, 7.0), (10, 6.0, 6.0, 6.1)])
    picture = tmp_path / 'compare.png'
    plt.close('all')
    plot.main([str(tmp_path / 'a'), str(tmp_path / 'b'), f'--out={picture}'])

    assert picture.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'log.jsonl:7: not JSON, skipped' in capsys.readouterr().err
    by_iter, by_time = plt.gcf().axes
    lines = {line.get_label(): line for line in by_iter.lines}
    assert list(lines['a val'].get_ydata()) == [7.1, 5.2, 4.3]
    assert list(lines['a train'].get_ydata()) == [7.0, 5.0, 4.0]
    assert list(lines['a val'].get_xdata()) == [0, 10, 20]
    assert list(lines['b val'].get_ydata()) == [7.0, 6.1]
    seconds = {line.get_label(): list(line.get_xdata()) for line in by_time.lines}
    assert seconds['a val'] == [0.0, 4.0, 8.0] and seconds['b val'] == [0.0, 6.0]
    assert by_iter.get_ylabel() == 'bits per character'
    plt.close('all')


def test_default_picture_goes_into_the_first_run(tmp_path):
    write_log(tmp_path / 'run', [(0, 0.0, 7.0, 7.1), (10, 4.0, 5.0, 5.2)])
    plot.main([str(tmp_path / 'run')])
    assert (tmp_path / 'run' / 'curves.png').stat().st_size > 0
    plt.close('all')


def test_bad_run_folders_are_refused_by_name(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='empty: no log.jsonl'):
        plot.main([str(tmp_path / 'empty')])
    steps_only = tmp_path / 'steps_only'
    steps_only.mkdir()
    (steps_only / 'log.jsonl').write_text(json.dumps(dict(iter=0, loss=2.0, train_s=0.1)) + '\n')
    with pytest.raises(SystemExit, match='no eval record yet'):
        plot.main([str(steps_only)])
    with pytest.raises(SystemExit, match='usage: python plot.py RUN_DIR'):
        plot.main(['--out=x.png'])
