"""Bad input to train.py and checkpoint.py: each case fails with one clear line and loses nothing of a
previous run, or works correctly."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
import train_start  # noqa: E402
from checkpoint import claim_out_dir, load_checkpoint, save_checkpoint  # noqa: E402
from test_train import data_dir, read_log, tiny_args  # noqa: E402,F401 (data_dir is a fixture)
from tokenizer import train_char  # noqa: E402


def run_cli(*args, cwd=ROOT):
    """train.py as a user runs it: (exit code, stderr lines)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / 'train.py'), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stderr.strip().splitlines()


def snapshot(out_dir):
    return {name: (Path(out_dir) / name).read_bytes() for name in ('log.jsonl', 'ckpt.pt', 'best.pt')}


@pytest.fixture(scope='module')
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    train.main(tiny_args(data_dir, out))
    return out


def test_a_bad_option_is_one_line_on_stderr(data_dir, tmp_path):
    code, stderr = run_cli(*tiny_args(data_dir, tmp_path / 'out', gradient_accumulation_steps=0))
    assert code != 0 and len(stderr) == 1 and 'Traceback' not in stderr[0]
    assert stderr[0] == '--gradient_accumulation_steps must be >= 1, not 0'
    assert not (tmp_path / 'out').exists()  # refused before out_dir was touched


def test_a_missing_dataset_names_the_command_and_keeps_the_log(finished_run, tmp_path):
    before = snapshot(finished_run)
    # even with --overwrite, a start that fails its checks touches nothing
    code, stderr = run_cli('config/tiny.py', f'--out_dir={finished_run}', '--dataset=covd', '--overwrite')
    assert code != 0 and len(stderr) == 1 and 'Traceback' not in stderr[0]
    assert 'data/covd/' in stderr[0] and 'prepare/' in stderr[0]
    assert snapshot(finished_run) == before  # the log was not truncated


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('batch_size', 0, '--batch_size must be >= 1'),
        ('eval_interval', 0, '--eval_interval must be >= 1'),
        ('learning_rate', 'nan', '--learning_rate must be a finite number > 0'),
        ('max_iters', -1, '--max_iters must be >= 0'),
        ('gradient_accumulation_steps', 0, '--gradient_accumulation_steps must be >= 1'),
    ],
)
def test_numeric_options_are_checked(data_dir, tmp_path, key, value, message):
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args(data_dir, tmp_path / 'out', **{key: value}))
    assert not (tmp_path / 'out').exists()


def test_a_scratch_run_never_replaces_a_previous_run_unasked(data_dir, finished_run):
    before = snapshot(finished_run)
    with pytest.raises(SystemExit, match=r'holds a previous run \(ckpt.pt, best.pt, log.jsonl\).*--overwrite'):
        train.main(tiny_args(data_dir, finished_run))
    assert snapshot(finished_run) == before


def test_overwrite_starts_over(data_dir, tmp_path):
    train.main(tiny_args(data_dir, tmp_path, max_iters=4))
    train.main(tiny_args(data_dir, tmp_path, overwrite=True, max_iters=8))
    assert [r['iter'] for r in read_log(tmp_path) if 'val_loss' in r] == [0, 4, 8]  # one run's log, not two


def test_a_second_run_in_a_held_out_dir_is_refused_and_a_killed_holder_frees_it(data_dir, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, time; from checkpoint import claim_out_dir; '
            f'lock = claim_out_dir({str(tmp_path)!r}); print("held", flush=True); time.sleep(60)',
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(SystemExit, match=rf'in use by another run \(pid {holder.pid}, started '):
            train.main(tiny_args(data_dir, tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim_out_dir(str(tmp_path)).close()  # kill -9 left no stuck lock


def test_killed_writes_leave_no_temporaries(tmp_path):
    stale = tmp_path / '.ckpt.pt.x1y2z3.tmp'  # what save_checkpoint leaves when killed mid-write
    stale.write_bytes(b'half a checkpoint')
    claim_out_dir(str(tmp_path)).close()
    assert not stale.exists()
    save_checkpoint({'model': {'w': torch.ones(1)}, 'model_args': {}}, str(tmp_path / 'ckpt.pt'))
    assert sorted(os.listdir(tmp_path)) == ['.lock', 'ckpt.pt']


def test_best_is_written_before_last(data_dir, tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(train, 'save_checkpoint', lambda checkpoint, path: order.append(os.path.basename(path)))
    train.main(tiny_args(data_dir, tmp_path, max_iters=4, eval_interval=4))
    assert order == ['best.pt', 'ckpt.pt']


@pytest.mark.parametrize(
    'override, message',
    [
        (dict(n_layer=2), r"--n_layer=2 differs from .*ckpt.pt's 1"),
        (dict(block_size=32), r"--block_size=32 differs from .*ckpt.pt's 16"),
        # asked for explicitly, even when it is the default's value (train.py's block_size default is 512)
        (dict(block_size=512), r"--block_size=512 differs from .*ckpt.pt's 16"),
    ],
)
def test_resume_refuses_another_architecture(data_dir, finished_run, override, message):
    before = snapshot(finished_run)
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args(data_dir, finished_run, init_from='resume', max_iters=12, **override))
    assert snapshot(finished_run) == before


def test_resume_without_the_shape_keys_takes_the_checkpoints(data_dir, finished_run, tmp_path):
    """Keys left at their defaults take the checkpoint's values, and the saved config says so."""
    out = tmp_path / 'copy'
    out.mkdir()
    for name in ('ckpt.pt', 'best.pt', 'log.jsonl'):
        (out / name).write_bytes((finished_run / name).read_bytes())
    args = [
        a
        for a in tiny_args(data_dir, out, init_from='resume', max_iters=12)
        if not a.startswith(('--n_layer', '--n_head', '--n_embd'))
    ]
    train.main(args)
    saved = load_checkpoint(str(out / 'ckpt.pt'))
    assert saved['iter_num'] == 12 and saved['config']['n_layer'] == saved['model_args']['n_layer'] == 1


def test_huge_block_sizes_are_refused_before_any_memory_is_used(data_dir, tmp_path):
    with pytest.raises(
        SystemExit, match=r'train.bin has 20,000 tokens, fewer than one window of block_size\+1 = 100,001'
    ):
        train.main(tiny_args(data_dir, tmp_path, block_size=100000))
    with pytest.raises(SystemExit, match=r'block_size=1,900 needs about .* GiB for attention alone'):
        train.main(tiny_args(data_dir, tmp_path, block_size=1900, batch_size=100000))
    assert not os.path.exists(tmp_path / 'log.jsonl')


@pytest.mark.parametrize('content, problem', [(b'', 'is empty'), (b'\x01\x02\x03', 'has an odd number of bytes')])
def test_broken_token_files_are_named(data_dir, tmp_path, content, problem):
    broken = tmp_path / 'data'
    broken.mkdir()
    for name in os.listdir(data_dir):
        (broken / name).write_bytes((Path(data_dir) / name).read_bytes())
    (broken / 'train.bin').write_bytes(content)
    with pytest.raises(SystemExit, match=f'train.bin {problem}: it must hold uint16 token ids'):
        train.main(tiny_args(broken, tmp_path / 'out'))


def test_a_file_that_is_not_a_checkpoint_gets_no_unsafe_advice(tmp_path):
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    evil, noise = tmp_path / 'evil.pt', tmp_path / 'noise.pt'
    evil.write_bytes(pickle.dumps(Payload()))
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (evil, noise):
        with pytest.raises(ValueError) as error:
            load_checkpoint(str(path))
        assert 'not a checkpoint this project wrote' in str(error.value)
        assert 'weights_only=False' not in str(error.value) and 'weights_only` set to `False' not in str(error.value)
    assert not marker.exists()  # the pickle's code never ran


def test_a_run_carries_its_tokenizer_and_refuses_another(data_dir, tmp_path):
    tokenized = tmp_path / 'data'
    tokenized.mkdir()
    for name in os.listdir(data_dir):
        (tokenized / name).write_bytes((Path(data_dir) / name).read_bytes())
    train_char(['发烧咳嗽'], str(tokenized / 'tokenizer.model'), vocab_size=300)
    out = tmp_path / 'out'
    train.main(tiny_args(tokenized, out, max_iters=4))
    record = load_checkpoint(str(out / 'ckpt.pt'))['tokenizer']
    assert record['data'] == (tokenized / 'tokenizer.model').read_bytes()
    train_char(['头痛腹泻'], str(tokenized / 'tokenizer.model'), vocab_size=300)  # the data set rebuilt
    with pytest.raises(SystemExit, match=rf"trained with tokenizer sha256 {record['sha256'][:12]}, but .* is "):
        train.main(tiny_args(tokenized, out, init_from='resume', max_iters=8))


def test_continued_pretraining_starts_from_the_given_weights(data_dir, finished_run, tmp_path):
    """init_from=<a run's folder>: its best weights, a fresh optimiser and schedule from iter 0."""
    train.main(tiny_args(data_dir, tmp_path, init_from=str(finished_run), max_iters=4, lexical=False, entity=True))
    source_best = min(r['val_loss'] for r in read_log(finished_run) if 'val_loss' in r)
    evals = [r for r in read_log(tmp_path) if 'val_loss' in r]
    # the same evaluation windows, the same weights: iteration 0 scores what the source's best scored
    assert evals[0]['iter'] == 0 and evals[0]['val_loss'] == pytest.approx(source_best, rel=1e-6)
    continued = load_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert continued['iter_num'] == 4 and continued['model_args']['n_lexical'] == 4  # the source's table kept
    train.main(tiny_args(data_dir, tmp_path, init_from='resume', max_iters=8))  # and it resumes as any run
    assert load_checkpoint(str(tmp_path / 'ckpt.pt'))['iter_num'] == 8


def test_the_passes_line_warns_before_memorising(capsys):
    train_start.report_passes(1000 * 2048, 100_000, 'data/x')
    out = capsys.readouterr().out
    assert 'reads 2,048,000 tokens: 20.5 passes over the 100,000 training tokens of data/x' in out
    assert 'WARNING: 20 passes' in out and '--corpus' in out
    train_start.report_passes(1000 * 2048, 10_000_000, 'data/x')
    assert 'WARNING' not in capsys.readouterr().out
