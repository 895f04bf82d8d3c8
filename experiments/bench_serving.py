"""
The serving section of python -m experiments.bench: python serve.py, started as a user starts it, on a random model
of the benchmark's sizes, and 1, 4 and 16 clients streaming replies from it at once. Per row: requests/s, generated
tokens/s, and the time to first token (from sending a request to its first piece of content), median and 90th
percentile. serve.py generates for one request at a time, so with more clients a request waits for the others:
requests/s stays flat while the time to first token grows.
"""

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from checkpoint import save_checkpoint, tokenizer_record
from model import GPT, GPTConfig
from tokenizer import MIN_VOCAB, train_char

CLIENTS = (1, 4, 16)


def bench_serving(model_args, device, requests, max_tokens, prompt_tokens, seed):
    """One row per number of clients in CLIENTS, each row `requests` streamed requests of max_tokens sampled tokens,
    for a prompt of prompt_tokens tokens. The model has no tag tables (the server needs no tagger) and a character
    tokenizer of its vocabulary size (CJK characters, one token each)."""
    args = dict(model_args, n_lexical=0, n_entity=0)
    characters = ''.join(chr(0x4E00 + i) for i in range(args['vocab_size'] - MIN_VOCAB + 1))
    with tempfile.TemporaryDirectory() as folder:
        train_char([characters], os.path.join(folder, 'tokenizer.model'), args['vocab_size'])
        torch.manual_seed(seed)
        save_checkpoint(
            dict(
                model=GPT(GPTConfig(**args)).state_dict(),
                model_args=args,
                config={},
                tokenizer=tokenizer_record(os.path.join(folder, 'tokenizer.model')),
            ),
            os.path.join(folder, 'best.pt'),
        )
        with open(os.path.join(folder, 'serve.log'), 'w') as log:  # the server's access log
            server = subprocess.Popen(
                [sys.executable, 'serve.py', f'--out_dir={folder}', '--port=0', f'--device={device}'],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        try:
            # its start-up line: serving <model> at http://127.0.0.1:<port>/v1 (...)
            port = next(
                (int(line.split(':')[-1].split('/')[0]) for line in server.stdout if line.startswith('serving ')), None
            )
            if port is None:
                with open(log.name) as f:
                    raise SystemExit(f"python serve.py did not start: {f.read()[-500:]}")
            question = characters[: prompt_tokens - 2]  # with <patient> before and <doctor> after it
            streamed_request(port, question, max_tokens, seed=0)  # warm-up: the first request allocates
            return [serve_clients(port, question, clients, requests, max_tokens) for clients in CLIENTS]
        finally:
            server.terminate()
            server.wait()


def streamed_request(port, question, max_tokens, seed):
    """(seconds to the first piece of content, seconds to the end, completion tokens) of one streamed request."""
    body = json.dumps(
        dict(
            model='bench',
            messages=[dict(role='user', content=question)],
            max_tokens=max_tokens,
            temperature=1.0,
            top_k=0,
            seed=seed,
            stream=True,
            stream_options=dict(include_usage=True),
        )
    )
    start, first, tokens = time.perf_counter(), None, 0
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    try:
        connection.request('POST', '/v1/chat/completions', body, {'Content-Type': 'application/json'})
        for line in connection.getresponse():  # server-sent events, one line each
            chunk = json.loads(line[len(b'data: ') :]) if line.startswith(b'data: {') else {}
            if first is None and chunk.get('choices') and chunk['choices'][0]['delta'].get('content'):
                first = time.perf_counter() - start
            tokens = (chunk.get('usage') or {}).get('completion_tokens', tokens)
    finally:
        connection.close()
    end = time.perf_counter() - start
    return first or end, end, tokens


def serve_clients(port, question, clients, requests, max_tokens):
    """`clients` threads at once, each sending its share of the requests one after another."""
    per_client = max(1, requests // clients)

    def client(k):
        return [streamed_request(port, question, max_tokens, seed=k * per_client + r) for r in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = [result for results in pool.map(client, range(clients)) for result in results]  # (raises theirs)
        seconds = time.perf_counter() - start
    first_ms = np.array([first for first, _, _ in results]) * 1000
    return dict(
        clients=clients,
        requests=len(results),
        seconds=seconds,
        requests_per_s=len(results) / seconds,
        tokens_per_s=sum(tokens for _, _, tokens in results) / seconds,
        ttft_median_ms=float(np.median(first_ms)),
        ttft_p90_ms=float(np.percentile(first_ms, 90)),
    )


def serving_markdown(rows, max_tokens, prompt_tokens, device):
    return [
        f"## Serving: python serve.py on {device}, streamed requests of {max_tokens} sampled tokens after a "
        f"{prompt_tokens}-token prompt, one generation at a time",
        "",
        "| clients | requests | requests/s | tokens/s | first token, median ms | first token, p90 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
        f"{r['ttft_median_ms']:,.0f} | {r['ttft_p90_ms']:,.0f} |"
        for r in rows
    ]
