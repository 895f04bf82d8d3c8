"""
The data-preparation sections of python -m experiments.bench.

- bench_prepare: prepare/'s tag-and-encode step (tagging.tag_texts: normalise, encode, jieba POS, lexicon
  entities) in chars/s, one process vs several, on a fixed slice of COVID dialogue text, and whether both
  produced the same output;
- bench_prepare_scale (--prepare_scales=1,10,30): python -m prepare.pretrain --corpus on synthetic corpora of
  that many times the shared medical texts: build time, chars/s and peak RSS per scale.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import load_meta
from prepare.sources import DataError, read_text, source_file
from prepare.text import normalize
from tagging import lexicon_dir, tag_texts
from tokenizer import train_bpe

COVID_TEXT = 'covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt'


def raw_data_folder(cfg):
    # the Makefile's order: --src, then $CMED_DATA, then the read-only mirror beside the repo;
    # prepare/ itself falls back to data/raw/ and then to downloading
    return cfg.src or os.environ.get('CMED_DATA') or os.path.join('..', 'shared', 'data')


def tokenizer_for_prepare(cfg, text, folder):
    """(path, description): the prepared data set's tokenizer, else a BPE trained on the slice itself."""
    prepared = os.path.join('data', cfg.dataset, 'tokenizer.model')
    if os.path.exists(prepared):
        return prepared, prepared
    path = os.path.join(folder, 'tokenizer.model')
    train_bpe(normalize(text).split('\n'), path, vocab_size=cfg.vocab_size)
    return path, f"BPE, vocab {cfg.vocab_size}, trained on the slice (no {prepared})"


def bench_prepare(cfg):
    """chars/s of tagging.tag_texts (normalise, encode, jieba POS, lexicon entities), 1 vs N processes."""
    src = raw_data_folder(cfg)
    try:
        text = read_text(source_file(COVID_TEXT, src))[: cfg.prepare_chars]
        lexicon = lexicon_dir(src)
    except DataError as error:  # no mirror and no network: the other sections still stand
        return dict(available=False, reason=str(error))
    # one job per consultation, as prepare reads them
    jobs = [(record, (), None) for record in text.split('\nid=') if record]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer_path, tokenizer = tokenizer_for_prepare(cfg, text, folder)
        # load jieba and the lexicon in this process first: forked workers inherit them, so both runs
        # time the tagging itself, not jieba's start-up (a few seconds)
        tag_texts(jobs[:1], tokenizer_path, lexicon, workers=1)
        runs = {}
        for workers in (1, cfg.prepare_workers):
            start = time.perf_counter()
            tagged = tag_texts(jobs, tokenizer_path, lexicon, workers=workers)
            runs[workers] = (time.perf_counter() - start, tagged)
    chars = sum(len(record) for record, _, _ in jobs)
    (single_s, single_out), (multi_s, multi_out) = runs[1], runs[cfg.prepare_workers]
    same = all(np.array_equal(a, b) for one, many in zip(single_out, multi_out) for a, b in zip(one, many))
    return dict(
        available=True,
        source=COVID_TEXT,
        chars=chars,
        records=len(jobs),
        tokenizer=tokenizer,
        workers=cfg.prepare_workers,
        single_seconds=single_s,
        multi_seconds=multi_s,
        single_chars_per_s=chars / single_s,
        multi_chars_per_s=chars / multi_s,
        speedup=single_s / multi_s,
        outputs_match=same,
    )


def prepare_markdown(p):
    if p is None:
        return ["## Prepare", "", "skipped (--prepare_chars=0)"]
    if not p['available']:
        return ["## Prepare", "", f"prepare not available: {p['reason']}"]
    return [
        "## Prepare: tag + encode (tagging.tag_texts)",
        "",
        f"{p['chars']:,} characters ({p['records']} consultations) of {p['source']}; tokenizer: {p['tokenizer']}",
        "",
        "| processes | seconds | chars/s |",
        "|---:|---:|---:|",
        f"| 1 | {p['single_seconds']:.2f} | {p['single_chars_per_s']:,.0f} |",
        f"| {p['workers']} | {p['multi_seconds']:.2f} | {p['multi_chars_per_s']:,.0f} |",
        "",
        f"{p['speedup']:.2f}x with {p['workers']} processes; the same output: {'yes' if p['outputs_match'] else 'NO'}.",
    ]


# ----------------------------------------------------------------------------- prepare at scale

SCALE_SOURCES = (
    ('covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt', 'utf-8'),
    ('medical_book/fever.txt', 'utf-8'),
    ('department_qa/im_sample_gb18030.csv', 'gb18030'),
)


def synthetic_corpus(src, folder, copies, seed):
    """`copies` copies of the shared medical texts' sentences, each copy shuffled, written as .txt files of
    20-sentence documents: distinct documents to measure speed and memory with. They are near-duplicates of
    each other, so no model quality may be read from a model trained on them. Returns their characters."""
    sentences = []
    for rel, encoding in SCALE_SOURCES:
        text = read_text(source_file(rel, src), encoding)
        sentences += [s.strip() for s in re.split(r'(?<=[。！？\n])', text) if s.strip()]
    for copy in range(copies):
        order = np.random.default_rng([seed, copy]).permutation(len(sentences))
        with open(os.path.join(folder, f'copy{copy:03d}.txt'), 'w', encoding='utf-8') as f:
            f.writelines(
                ''.join(sentences[i] for i in order[start : start + 20]) + '\n\n' for start in range(0, len(order), 20)
            )
    return sum(map(len, sentences)) * copies


def bench_prepare_scale(cfg):
    """python -m prepare.pretrain --corpus on synthetic corpora of growing size: seconds, chars/s, peak RSS (the
    largest process of the build, its workers included: GNU time's %M)."""
    rows = []
    for scale in (int(x) for x in cfg.prepare_scales.split(',')):
        with tempfile.TemporaryDirectory() as folder:
            corpus, out, src = os.path.join(folder, 'corpus'), os.path.join(folder, 'out'), raw_data_folder(cfg)
            os.makedirs(corpus)
            chars = synthetic_corpus(src, corpus, scale, cfg.seed)
            command = [sys.executable, '-m', 'prepare.pretrain', '--corpus', corpus, '--out', out, '--src', src]
            command += ['--workers', str(cfg.prepare_workers)]
            start = time.perf_counter()
            finished = subprocess.run(['/usr/bin/time', '-f', '%M', *command], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if finished.returncode != 0:
                raise SystemExit(f"python -m prepare.pretrain failed at scale {scale}: {finished.stderr[-500:]}")
            meta = load_meta(out)
        rows.append(
            dict(
                scale=scale,
                chars=chars,
                seconds=seconds,
                chars_per_s=chars / seconds,
                tag_chars_per_s=meta['chars_per_s'],
                tokens=meta['splits']['train']['tokens'],
                peak_rss_mb=int(finished.stderr.strip().splitlines()[-1]) / 1024,
            )
        )
        print(rows[-1], flush=True)
    return rows


def prepare_scale_markdown(rows, workers):
    return [
        f"## python -m prepare.pretrain --corpus at scale ({workers} workers; synthetic: shuffled copies of "
        f"the shared medical texts)",
        "",
        "| scale | characters | seconds | chars/s (whole build) | chars/s (tagging) | train tokens | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['scale']}x | {r['chars']:,} | {r['seconds']:.0f} | {r['chars_per_s']:,.0f} | "
        f"{r['tag_chars_per_s']:,} | {r['tokens']:,} | {r['peak_rss_mb']:,.0f} |"
        for r in rows
    ]
