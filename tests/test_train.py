"""Tests of train.py, configurator.py and checkpoint.py on a tiny synthetic data set (CPU, seconds)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and friends are flat files at the repo root

import common  # noqa: E402
import train  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from configurator import configure  # noqa: E402

VOCAB = 64


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A data dir as prepare/ writes it: bins of learnable token streams with tags, and meta.json."""
    path = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    for split, n_tokens in (('train', 20_000), ('val', 2_000)):
        # mostly "next = previous + 1": a pattern a one-layer model learns in a few steps
        steps = np.where(rng.random(n_tokens) < 0.9, 1, rng.integers(0, VOCAB, n_tokens))
        tokens = np.cumsum(steps) % VOCAB
        tokens.astype(np.uint16).tofile(path / f"{split}.bin")
        rng.integers(0, 4, n_tokens, dtype=np.uint8).tofile(path / f"{split}.lex.bin")
        rng.integers(0, 2, n_tokens, dtype=np.uint8).tofile(path / f"{split}.ent.bin")
    meta = {
        'vocab_size': VOCAB,
        'lexical_map': {'other': 0, 'n': 1, 'v': 2, 'a': 3},
        'entity_map': {'none': 0, 'entity': 1},
    }
    (path / 'meta.json').write_text(json.dumps(meta))
    return path


def tiny_args(data_dir, out_dir, **overrides):
    """Command-line overrides for a model and run small enough to train in about a second."""
    settings = dict(
        dataset=data_dir,
        out_dir=out_dir,
        device='cpu',
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_iters=8,
        eval_interval=4,
        eval_iters=2,
        log_interval=1,
        learning_rate=1e-2,
        warmup_iters=2,
        lr_decay_iters=8,
        min_lr=1e-3,
        dropout=0.1,
        lexical=True,
        entity=True,
        peak_flops=1e9,
    )
    settings.update(overrides)
    return [f"--{key}={value}" for key, value in settings.items()]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


def train_losses(records):
    """iter -> training loss; a resumed run's later lines win over an earlier run's."""
    return {r['iter']: r['loss'] for r in records if 'loss' in r}


# ----------------------------------------------------------------------------- configurator

DEFAULTS = dict(max_iters=100, learning_rate=1e-3, compile=False, out_dir='out', top_k=None)


def test_overrides_are_typed_in_every_form():
    config = configure(
        DEFAULTS, ['--max_iters=5', '--learning_rate', '3e-4', '--compile', '--out_dir', 'runs/a', '--top_k=40']
    )
    assert config == dict(max_iters=5, learning_rate=3e-4, compile=True, out_dir='runs/a', top_k=40)
    assert type(config['max_iters']) is int and type(config['learning_rate']) is float


def test_boolean_flag_takes_an_explicit_value_and_config_file_comes_first(tmp_path):
    config_file = tmp_path / 'run.py'
    config_file.write_text("max_iters = 7\ncompile = True\n")
    config = configure(DEFAULTS, [str(config_file), '--compile', 'false', '--learning_rate=1'])
    assert config['max_iters'] == 7 and config['compile'] is False
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float


def test_given_keys_are_what_the_file_and_command_line_set_whatever_the_value(tmp_path):
    from configurator import given_keys

    config_file = tmp_path / 'run.py'
    config_file.write_text("max_iters = 100\n")  # the default's own value: still asked for
    assert given_keys(DEFAULTS, [str(config_file), '--compile', '--top_k=None']) == {'max_iters', 'compile', 'top_k'}
    assert given_keys(DEFAULTS, []) == set()


def test_unknown_key_names_the_closest_known_key(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'learnig_rate'.*'learning_rate'"):
        configure(DEFAULTS, ['--learnig_rate=0.1'])
    config_file = tmp_path / 'run.py'
    config_file.write_text("max_iter = 7\n")
    with pytest.raises(SystemExit, match="'max_iter'.*did you mean 'max_iters'"):
        configure(DEFAULTS, [str(config_file)])


def test_badly_typed_value_is_refused():
    with pytest.raises(SystemExit, match="bad value for --max_iters"):
        configure(DEFAULTS, ['--max_iters=1e3'])


# ----------------------------------------------------------------------------- checkpoint


def test_load_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    not_a_checkpoint = tmp_path / 'notes.pt'
    not_a_checkpoint.write_text("just some text")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_checkpoint(not_a_checkpoint)
    tensor_only = tmp_path / 'tensor.pt'
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_checkpoint(tensor_only)
    incomplete = tmp_path / 'incomplete.pt'
    torch.save({'model': {}}, incomplete)
    with pytest.raises(ValueError, match="missing model_args"):
        load_checkpoint(incomplete)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / 'absent.pt')


def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    save_checkpoint({'model': {'w': torch.ones(2)}, 'model_args': {}}, path)

    def write_half_then_fail(obj, f):
        f.write(b'half a checkpoint')
        raise OSError("disk full")

    monkeypatch.setattr(torch, 'save', write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({'model': {'w': torch.zeros(2)}, 'model_args': {}}, path)
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(2))
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temp file left behind


# ----------------------------------------------------------------------------- train.py


def test_learning_rate_warms_up_decays_and_holds():
    lrs = [
        common.learning_rate_at(it, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
        for it in range(200)
    ]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # cosine midpoint
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # falling
    assert set(lrs[110:]) == {0.1}  # held at min_lr


@pytest.mark.skipif(not os.path.exists('/proc/stat'), reason='the busy look reads Linux /proc/stat')
def test_busy_note_reports_other_work_on_the_cores_and_nothing_when_they_are_idle():
    """The start-up line says the machine looked busy exactly when other work shares this run's cores (then the
    measured peak is low): a busy loop on every core is seen; once they stop, the note is gone."""
    cores = os.sched_getaffinity(0)
    loops = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in cores]
    try:
        time.sleep(0.5)
        busy = common.busy_note('cpu')
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    time.sleep(0.3)
    assert 'looked busy' in busy and f"of {len(cores)} cores in use" in busy
    assert common.busy_note('cpu') == ''
    assert common.busy_note('cuda') == ''  # a GPU's peak is its datasheet's


def test_training_writes_metrics_and_checkpoints(data_dir, tmp_path, monkeypatch):
    # every token decodes to 2 characters, so bits per char must be val_loss / ln 2 / 2
    monkeypatch.setattr(train, 'load_char_counts', lambda _: np.full(VOCAB, 2))
    train.main(tiny_args(data_dir, tmp_path))
    records = read_log(tmp_path)
    evals = [r for r in records if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 4, 8]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.3  # it learns
    for r in evals:
        assert r['val_ppl'] == pytest.approx(math.exp(r['val_loss']))
        assert r['val_bpc'] == pytest.approx(r['val_loss'] / math.log(2) / 2)
    assert sorted(train_losses(records)) == list(range(8))
    checkpoint = load_checkpoint(tmp_path / 'ckpt.pt')
    assert checkpoint['iter_num'] == 8 and checkpoint['config']['max_iters'] == 8
    assert checkpoint['model_args']['n_lexical'] == 4 and checkpoint['model_args']['n_entity'] == 2
    assert load_checkpoint(tmp_path / 'best.pt')['best_val_loss'] == min(r['val_loss'] for r in evals)


def test_resumed_run_matches_uninterrupted_run(data_dir, tmp_path):
    train.main(tiny_args(data_dir, tmp_path / 'whole'))
    train.main(tiny_args(data_dir, tmp_path / 'split', max_iters=4))  # "interrupted" after iter 4
    train.main(tiny_args(data_dir, tmp_path / 'split', init_from='resume'))
    whole, split = read_log(tmp_path / 'whole'), read_log(tmp_path / 'split')
    assert train_losses(split) == pytest.approx(train_losses(whole), rel=1e-6)
    assert [r['val_loss'] for r in split if r['iter'] == 8 and 'val_loss' in r] == pytest.approx(
        [r['val_loss'] for r in whole if r['iter'] == 8 and 'val_loss' in r], rel=1e-6
    )


def test_each_rank_reads_different_windows(data_dir):
    windows = common.Windows(str(data_dir), 16, 4, ['lexical'], 'cpu')
    rank0, rank1 = (windows.batch('train', train.window_rng(0, rank, train.TRAIN_STREAM, 5)) for rank in (0, 1))
    assert not torch.equal(rank0['idx'], rank1['idx'])
    assert torch.equal(rank0['idx'][:, 1:], rank0['targets'][:, :-1])  # targets are inputs shifted
    assert rank0['lexical'].shape == rank0['idx'].shape


@pytest.mark.parametrize('log_interval, stop_iter', [(1, 1), (3, 3)])
def test_non_finite_loss_stops_float32_training_without_a_checkpoint(data_dir, tmp_path, log_interval, stop_iter):
    # an absurd learning rate blows the weights up after one step, so the next loss is nan or inf;
    # the loss is read (and checked) at logged iterations only, so the stop comes at the next of those
    with pytest.raises(SystemExit, match=f"non-finite training loss .* iter {stop_iter} .*float32"):
        train.main(
            tiny_args(
                data_dir,
                tmp_path,
                learning_rate=1e30,
                warmup_iters=0,
                grad_clip=0.0,
                log_interval=log_interval,
                dtype='float32',
            )
        )  # auto is bf16 on a CPU with AMX
    assert not (tmp_path / 'ckpt.pt').exists() and not (tmp_path / 'best.pt').exists()


def test_ddp_on_two_cpu_processes_learns_and_keeps_ranks_in_step(data_dir, tmp_path):
    # 4 micro-steps over 2 ranks: each rank runs 2, so no_sync is used on the first of them
    command = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        str(ROOT / 'train.py'),
        *tiny_args(data_dir, tmp_path, gradient_accumulation_steps=4),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_log(tmp_path)
    evals = [r for r in records if 'val_loss' in r]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.3
    checksums = [r['param_checksums'] for r in records if 'param_checksums' in r]
    assert len(checksums) == 1 and len(checksums[0]) == 2 and checksums[0][0] == checksums[0][1]


def test_resuming_from_a_truncated_ckpt_names_it_and_the_best_checkpoint_to_fall_back_to(data_dir, tmp_path):
    train.main(tiny_args(data_dir, tmp_path, max_iters=4))
    data = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt').write_bytes(data[: len(data) // 3])  # a copy cut short
    with pytest.raises(SystemExit) as refused:
        train.main(tiny_args(data_dir, tmp_path, init_from='resume', max_iters=8))
    assert refused.value.code.startswith(f'cannot resume: {tmp_path / "ckpt.pt"} is truncated or damaged')
    assert f'fall back to {tmp_path / "best.pt"}' in refused.value.code and 'convert.py' not in refused.value.code
