"""Smoke test of bench.py: a toy-sized run writes every number, finite and positive (never judged for speed)."""

import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ and the modules bench.py imports sit at the repo root

from experiments import bench, bench_prepare  # noqa: E402

MIRROR = os.environ.get('CMED_DATA') or str(ROOT.parent / 'shared' / 'data')
TRAIN_NUMBERS = ('steps', 'ms_per_step', 'tokens_per_s', 'mfu')
GENERATE_NUMBERS = (
    'new_tokens',
    'prompt_tokens',
    'block_size',
    'cached_tokens_per_s',
    'recompute_tokens_per_s',
    'speedup',
)
BATCH_NUMBERS = ('replies', 'new_tokens', 'seconds', 'replies_per_s', 'tokens_per_s', 'speedup')
SERVE_NUMBERS = ('requests', 'seconds', 'requests_per_s', 'tokens_per_s', 'ttft_median_ms', 'ttft_p90_ms')
PREPARE_NUMBERS = (
    'chars',
    'records',
    'workers',
    'single_seconds',
    'multi_seconds',
    'single_chars_per_s',
    'multi_chars_per_s',
    'speedup',
)


def assert_positive_numbers(record, keys):
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)


def test_bench_writes_every_number(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # bench reads data/<dataset>/ relative to the repo, as train.py does
    has_mirror = os.path.exists(os.path.join(MIRROR, bench_prepare.COVID_TEXT))
    out = tmp_path / 'bench.json'
    # a dataset that does not exist: random tokens, whatever has been prepared in data/
    args = [
        '--device=cpu',
        '--n_layer=1',
        '--n_head=2',
        '--n_embd=32',
        '--block_size=16',
        '--batch_size=2',
        '--vocab_size=2000',
        '--warmup_steps=1',
        '--steps=2',
        '--cpu_bf16_steps=1',
        '--gen_tokens=24',
        '--reply_sources=3',
        '--reply_tokens=4',
        '--peak_flops=1e10',
        f'--dataset={tmp_path / "no_data"}',
        f'--src={MIRROR}',
        f'--out={out}',
        f'--prepare_chars={3000 if has_mirror else 0}',
        '--serve_requests=4',
        '--serve_tokens=4',
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model gains nothing from threads, and loses much on a busy machine
    try:
        bench.main(args)
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text(encoding='utf-8'))

    machine = results['machine']
    assert machine['device'] == 'cpu' and machine['device_name'] and machine['peak_source']
    assert_positive_numbers(machine, ('threads', 'peak_flops'))
    assert results['config']['data'].startswith('random tokens')
    assert_positive_numbers(results['config'], ('params', 'tokens_per_step'))
    assert {(row['attention'], row['dtype']) for row in results['train']} == {
        (a, d) for a in ('manual', 'fused') for d in ('float32', 'bfloat16')
    }
    for row in results['train']:
        assert_positive_numbers(row, TRAIN_NUMBERS)
    assert_positive_numbers(results['generate'], GENERATE_NUMBERS)
    assert results['generate']['tokens_match'] is True  # the KV cache changes the speed, never the tokens
    batch = results['batch']  # replies in batches: data/covid's test sources, when it has been prepared
    assert batch['available'] == os.path.isfile(ROOT / 'data' / 'covid' / 'test.offsets.npy')
    if batch['available']:
        assert [row['batch_size'] for row in batch['rows']] == [1, 8, 32]
        for row in batch['rows']:
            assert_positive_numbers(row, BATCH_NUMBERS)
            assert row['replies'] == 3 and row['new_tokens'] <= 3 * 4
    assert [row['clients'] for row in results['serve']] == [1, 4, 16]
    assert [row['requests'] for row in results['serve']] == [4, 4, 16]  # 4 spread over the clients, at least one each
    for row in results['serve']:
        assert_positive_numbers(row, SERVE_NUMBERS)
    if has_mirror:
        prepare = results['prepare']
        assert prepare['available'] is True, prepare
        assert_positive_numbers(prepare, PREPARE_NUMBERS)
        assert prepare['outputs_match'] is True  # more processes, the same bytes
    else:
        assert results['prepare'] is None


def test_synthetic_corpus_copies_are_distinct_documents(tmp_path):
    chars = bench_prepare.synthetic_corpus(MIRROR, str(tmp_path), 2, seed=0)
    copies = [(tmp_path / f'copy{k:03d}.txt').read_text(encoding='utf-8') for k in range(2)]
    documents = [doc for text in copies for doc in text.split('\n\n') if doc]
    assert sum(len(doc) for doc in documents) == chars and chars > 1_000_000
    assert len(set(documents)) == len(documents)  # shuffled: no document repeats across copies
    assert sorted(copies[0].replace('\n', '')) == sorted(copies[1].replace('\n', ''))  # the same characters
