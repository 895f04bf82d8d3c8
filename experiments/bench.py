"""
How fast is the code? Training, generation and data preparation, measured on this machine.

    python -m experiments.bench                                 # config/tiny.py's sizes on whatever device there is
    python -m experiments.bench config/base.py --device=cuda    # any train.py config file, any train.py key
    python -m experiments.bench --steps=50 --out=bench.json     # also write the numbers as JSON

Prints Markdown tables:
- training tokens/s and MFU, hand-written vs fused attention, float32 vs bfloat16 (and float16 with the
  gradient scaler on a GPU). Every row's MFU divides by the one peak train.py uses (common.peak_flops:
  a known GPU's datasheet bf16 figure, else the best of five 2048x2048 matmuls in the dtype train.py
  would choose here); the output says which;
- generation tokens/s with the KV cache vs full recompute (greedy, one model), and whether the two
  produced the same tokens;
- replies/s generating in batches of 1, 8 and 32 (experiments/bench_batch.py): greedy replies to real COVID-DDC
  test sources from data/<reply_dataset>/, generated as eval.py --generate does, and whether they equal batch 1's;
- prepare/'s tag-and-encode step in chars/s, one process vs several, on a fixed slice of real text
  (experiments/bench_prepare.py);
- serving (experiments/bench_serving.py): python serve.py on a random model of the same sizes, requests/s and
  time to first token with 1, 4 and 16 clients streaming replies at once.
With --prepare_scales=1,10,30 it instead builds synthetic corpora of that many times the shared medical
texts with python -m prepare.pretrain --corpus and prints build time, chars/s and peak RSS per scale
(experiments/bench_prepare.py).
It trains on data/<dataset>/ when that has been prepared, else on random tokens (the output says which).
A benchmark, not a test: it asserts nothing about speed.
"""

import json
import os
import platform
import time
from types import SimpleNamespace

import numpy as np
import torch

from common import (
    TAG_FILES,
    Windows,
    autocast_context,
    device_type,
    load_meta,
    measure_matmul_flops,
    new_model_args,
    optimizer_step,
    peak_flops,
    resolve_device_and_dtype,
    synchronize,
)
from configurator import configure
from experiments.bench_batch import batch_markdown, bench_batched_replies
from experiments.bench_prepare import bench_prepare, bench_prepare_scale, prepare_markdown, prepare_scale_markdown
from experiments.bench_serving import bench_serving, serving_markdown
from model import GPT, GPTConfig
from optim import configure_optimizers
from tagging import LEXICAL_MAP, entity_map

# The train.py keys a benchmark uses, at config/tiny.py's sizes (a 2-core CPU in a minute or two); a
# train.py config file works here too: its other keys (out_dir, max_iters, ...) are listed and ignored.
# fmt: off
DEFAULTS = dict(
    dataset='pretrain', device='auto', dtype='auto', compile=False, seed=1337, peak_flops=0.0,
    n_layer=4, n_head=4, n_embd=192, block_size=128, dropout=0.0, bias=False, lexical=False, entity=False,
    attention='fused', batch_size=16, gradient_accumulation_steps=1,
    learning_rate=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=0.5,
    vocab_size=8000,       # for random tokens, and the tokenizer trained when data/<dataset>/ has none
    warmup_steps=3,        # untimed steps first: allocation, caches, torch.compile
    steps=20,              # timed training steps per row
    cpu_bf16_steps=5,      # CPUs without native bf16 run it many times slower: fewer timed steps there
    gen_tokens=256,        # new tokens per generation
    reply_dataset='covid',  # replies in batches: the example set whose test sources are answered
    reply_sources=64,      # ... how many of them at each batch size; 0 skips that section
    reply_tokens=64,       # ... tokens per reply (at most: a reply also ends where a turn would)
    prepare_chars=300_000,  # characters of COVID dialogue text to tag; 0 skips that section
    prepare_workers=2,     # processes for the multi-process prepare run
    prepare_scales='',     # e.g. '1,10,30': instead, time python -m prepare.pretrain --corpus on synthetic
                           # corpora that many times the shared medical texts: build time, chars/s and peak
                           # memory per scale
    serve_requests=32,     # streamed requests per row of the serving table, spread over its clients; 0 skips it
    serve_tokens=32,       # tokens per served reply
    src='',                # folder of the raw data sets; '' = $CMED_DATA, else ../shared/data
    out='',                # write the numbers to this JSON file too
)
# fmt: on
PROMPT_TOKENS = 16  # generation starts from this many tokens of the data


# ----------------------------------------------------------------------------- machine


def cpu_name():
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()  # no such line (macOS, some ARM Linux)


def machine_info(device, peak_flops_override):
    """Device name, software, threads, and the peak FLOP/s that every MFU below is a fraction of."""
    info = dict(
        device=device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_cores=os.cpu_count(),
        cpu=cpu_name(),
    )
    on_gpu = device.startswith('cuda')
    info['device_name'] = torch.cuda.get_device_name(device) if on_gpu else info['cpu']
    if peak_flops_override:
        info['peak_flops'], info['peak_source'] = peak_flops_override, 'given (--peak_flops)'
    else:
        # one peak for every row, so that float32 and bfloat16 MFU compare: the peak train.py divides by
        # in the dtype it would choose here; on a CPU the other dtype's matmul speed is shown beside it
        _, dtype, _ = resolve_device_and_dtype(device, 'auto')
        info['peak_flops'], info['peak_source'] = peak_flops(device, dtype)
        if not on_gpu:  # the other dtype's speed, for comparison (512: emulated bf16 runs below 1 GFLOP/s)
            other = 'bfloat16' if dtype == 'float32' else 'float32'
            info['other_dtype'] = other
            info['other_matmul_flops'] = measure_matmul_flops(device, getattr(torch, other), 512)
    return info


def seconds_per_call(fn, warmup, repeats, device):
    """Mean wall time of fn() over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


# ----------------------------------------------------------------------------- data


class RandomTokens:
    """Uniformly random tokens (and tags) in the shape of Windows' batches, for when no data is prepared."""

    def __init__(self, model_args, batch_size, device):
        self.model_args, self.batch_size, self.device = model_args, batch_size, device

    def batch(self, split, rng):
        T, V = self.model_args['block_size'], self.model_args['vocab_size']
        windows = torch.from_numpy(rng.integers(0, V, size=(self.batch_size, T + 1)))  # (B, T+1)
        inputs = {'idx': windows[:, :-1], 'targets': windows[:, 1:]}
        for name in TAG_FILES:
            n_tags = self.model_args[f"n_{name}"]
            if n_tags:
                inputs[name] = torch.from_numpy(rng.integers(0, n_tags, size=(self.batch_size, T)))
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}


def load_data(cfg, device):
    """(model_args, batches, description): data/<dataset>/ when prepared, else random tokens."""
    data_dir = os.path.join('data', cfg.dataset)
    if os.path.exists(os.path.join(data_dir, 'meta.json')) and os.path.exists(os.path.join(data_dir, 'train.bin')):
        model_args = new_model_args(cfg, load_meta(data_dir))
        tag_inputs = [name for name in TAG_FILES if model_args[f"n_{name}"]]
        n_tokens = os.path.getsize(os.path.join(data_dir, 'train.bin')) // 2  # uint16
        description = f"{data_dir}/ (prepared: {n_tokens:,} training tokens)"
        return model_args, Windows(data_dir, cfg.block_size, cfg.batch_size, tag_inputs, device), description
    meta = {'vocab_size': cfg.vocab_size, 'lexical_map': LEXICAL_MAP, 'entity_map': entity_map()}
    model_args = new_model_args(cfg, meta)
    description = f"random tokens (no prepared {data_dir}/), vocab {cfg.vocab_size}"
    return model_args, RandomTokens(model_args, cfg.batch_size, device), description


# ----------------------------------------------------------------------------- training


def bench_training(cfg, model_args, batches, device, attention, dtype, peak_flops):
    """One row: seconds per optimizer step, tokens/s and MFU for one attention kind and precision."""
    torch.manual_seed(cfg.seed)  # the same initial weights in every row
    model = GPT(GPTConfig(**dict(model_args, attention=attention))).to(device)
    optimizer = configure_optimizers(
        model, 'adamw', cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type(device)
    )
    scaler = torch.amp.GradScaler(device_type(device), enabled=dtype == 'float16')
    step_model = torch.compile(model) if cfg.compile else model
    autocast = autocast_context(device, dtype)
    rng = np.random.default_rng(cfg.seed)  # the same batches in every row
    accum = cfg.gradient_accumulation_steps

    def step():  # what train.py does per iteration: accumulate, then clip and step (fp16: with the scaler)
        for _ in range(accum):
            with autocast:
                _, loss = step_model(**batches.batch('train', rng))
            scaler.scale(loss / accum).backward()
        optimizer_step(optimizer, scaler, model.parameters(), cfg.grad_clip, cfg.learning_rate)

    on_gpu = device.startswith('cuda')
    steps = cfg.steps if on_gpu or dtype == 'float32' else min(cfg.steps, cfg.cpu_bf16_steps)
    seconds = seconds_per_call(step, cfg.warmup_steps, steps, device)
    tokens_per_step = cfg.batch_size * model_args['block_size'] * accum
    return dict(
        attention=attention,
        dtype=dtype,
        steps=steps,
        ms_per_step=seconds * 1000,
        tokens_per_s=tokens_per_step / seconds,
        mfu=model.estimate_mfu(cfg.batch_size * accum, seconds, peak_flops, model_args['block_size']),
    )


# ----------------------------------------------------------------------------- generation


def bench_generation(cfg, model_args, prompt, device, dtype):
    """Greedy generation of gen_tokens with the KV cache and with full recompute, from one model."""
    # past block_size generate() crops and rebuilds the cache every token, which would hide what the
    # cache buys: give the model room for the whole generation
    block_size = max(model_args['block_size'], prompt.size(1) + cfg.gen_tokens)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**dict(model_args, block_size=block_size))).to(device).eval()
    autocast = autocast_context(device, dtype)
    result = dict(
        new_tokens=cfg.gen_tokens,
        prompt_tokens=prompt.size(1),
        block_size=block_size,
        dtype=dtype,
        attention=model_args['attention'],
    )
    outputs = {}
    for name, use_cache in (('cached', True), ('recompute', False)):

        def generate(n_tokens):
            with autocast:
                return model.generate(prompt, n_tokens, temperature=0, use_cache=use_cache)

        generate(8)  # warm-up: first calls allocate; a whole generation would double the bench's time
        synchronize(device)
        start = time.perf_counter()
        outputs[name] = generate(cfg.gen_tokens)
        synchronize(device)
        result[f"{name}_tokens_per_s"] = cfg.gen_tokens / (time.perf_counter() - start)
    result['speedup'] = result['cached_tokens_per_s'] / result['recompute_tokens_per_s']
    result['tokens_match'] = torch.equal(outputs['cached'], outputs['recompute'])
    return result


# ----------------------------------------------------------------------------- output


def markdown(results):
    sections = [
        machine_markdown(results['machine'], results['config']),
        training_markdown(results['train']),
        generation_markdown(results['generate']),
    ]
    if results['batch'] is not None:
        sections.append(batch_markdown(results['batch']))
    sections.append(prepare_markdown(results['prepare']))
    if results['serve'] is not None:
        sections.append(
            serving_markdown(
                results['serve'], results['config']['serve_tokens'], PROMPT_TOKENS, results['machine']['device']
            )
        )
    return '\n\n'.join('\n'.join(lines) for lines in sections)


def machine_markdown(m, c):
    other = (
        f"; a {m['other_dtype']} 512x512 matmul ran at {m['other_matmul_flops'] / 1e9:,.1f} GFLOP/s"
        if 'other_dtype' in m
        else ''
    )
    return [
        "## Machine",
        "",
        f"- device: {m['device']}, {m['device_name']}; torch {m['torch']}, {m['threads']} threads, "
        f"{m['cpu_cores']} CPU cores",
        f"- MFU is against {m['peak_flops'] / 1e12:.3f} TFLOP/s ({m['peak_source']}){other}",
        f"- model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, block {c['block_size']}, "
        f"vocab {c['vocab_size']}, {c['params'] / 1e6:.2f}M parameters, random initial weights",
        f"- {c['tokens_per_step']:,} tokens per step ({c['batch_size']} x {c['block_size']} x "
        f"{c['gradient_accumulation_steps']} accumulation){', torch.compile' if c['compile'] else ''}",
        f"- data: {c['data']}",
    ]


def training_markdown(rows):
    lines = [
        "## Training",
        "",
        "| attention | dtype | timed steps | ms/step | tokens/s | MFU |",
        "|---|---|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {r['attention']} | {r['dtype']} | {r['steps']} | {r['ms_per_step']:,.1f} | "
        f"{r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f}% |"
        for r in rows
    ]


def generation_markdown(g):
    rows = [(mode, g[f"{key}_tokens_per_s"]) for mode, key in (('on', 'cached'), ('off (full recompute)', 'recompute'))]
    return (
        [
            f"## Generation: {g['new_tokens']} new tokens, greedy, batch 1, {g['prompt_tokens']}-token prompt, "
            f"{g['dtype']}, {g['attention']} attention, block {g['block_size']}",
            "",
            "| KV cache | tokens/s | ms/token |",
            "|---|---:|---:|",
        ]
        + [f"| {mode} | {tokens_per_s:,.1f} | {1000 / tokens_per_s:.2f} |" for mode, tokens_per_s in rows]
        + [
            "",
            f"The cache is {g['speedup']:.1f}x faster; the same tokens with and without it: "
            f"{'yes' if g['tokens_match'] else 'NO'}.",
        ]
    )


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv, file_keys_elsewhere=True))
    if cfg.prepare_scales:
        rows = bench_prepare_scale(cfg)
        print('\n'.join(prepare_scale_markdown(rows, cfg.prepare_workers)))
        return rows
    device, dtype, _ = resolve_device_and_dtype(cfg.device, cfg.dtype)
    # as train.py: float32 matmuls may use TF32 on Ampere+ GPUs
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    machine = machine_info(device, cfg.peak_flops)
    model_args, batches, data = load_data(cfg, device)
    config = dict(
        model_args,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        tokens_per_step=cfg.batch_size * model_args['block_size'] * cfg.gradient_accumulation_steps,
        params=GPT(GPTConfig(**model_args)).num_params(),
        compile=cfg.compile,
        data=data,
        serve_tokens=cfg.serve_tokens,
    )
    precisions = ('float32', 'bfloat16', 'float16') if device.startswith('cuda') else ('float32', 'bfloat16')
    rows = [
        bench_training(cfg, model_args, batches, device, attention, precision, machine['peak_flops'])
        for precision in precisions
        for attention in ('manual', 'fused')
    ]
    prompt = batches.batch('val', np.random.default_rng(cfg.seed))['idx'][:1, :PROMPT_TOKENS]  # (1, P)
    generation = bench_generation(cfg, model_args, prompt, device, dtype)
    batched = None
    if cfg.reply_sources > 0:
        reply_dir = os.path.join('data', cfg.reply_dataset)  # (an absolute path stays itself)
        batched = bench_batched_replies(
            model_args, device, dtype, reply_dir, cfg.reply_sources, cfg.reply_tokens, cfg.seed
        )
    preparation = bench_prepare(cfg) if cfg.prepare_chars > 0 else None
    serving = (
        bench_serving(model_args, device, cfg.serve_requests, cfg.serve_tokens, PROMPT_TOKENS, cfg.seed)
        if cfg.serve_requests > 0
        else None
    )
    results = dict(
        machine=machine,
        config=config,
        train=rows,
        generate=generation,
        batch=batched,
        prepare=preparation,
        serve=serving,
        seconds=time.perf_counter() - started,
    )
    print(markdown(results))
    print(f"\n(bench took {results['seconds']:.0f} s)")
    if cfg.out:
        with open(cfg.out, 'w', encoding='utf-8') as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    return results


if __name__ == '__main__':
    main()
