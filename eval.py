"""
Score any model a user has (a pretraining run, a fine-tuned run, a p-tuned prompt.pt with its base) on text:
loss, perplexity per token and bits per character.

    python eval.py --out_dir=out/tiny --text=notes.txt                  # any text file, streamed
    python eval.py --out_dir=out/tiny --text=dialogues.jsonl            # any corpus file prepare/ reads
    python eval.py --out_dir=out/finetune --dataset=covid --split=test  # the doctor replies of an example set
    python eval.py --out_dir=out/finetune --dataset=imcs --generate     # + replies generated and scored

--text: a .txt file is read as it is, in pieces of at most chunk_bytes bytes (each cut after its last newline,
if it has one) whatever its line lengths, with a progress bar; a .jsonl, .json or .csv file (or a .txt file with
--documents=block|line|file) is read by prepare/corpus.py's readers, each document written as pretraining
writes it (dialogues with speaker pieces, cleaned text) and followed by <eot>. The encoding is detected as the
corpus readers detect it (UTF-8, UTF-16 with a BOM, or GB18030), or given with --encoding. Either way the tokens
come from the model's own tokenizer (the one its checkpoint carries); windows of block_size tokens slide by `stride`,
and each window scores only the tokens the previous one did not, so every token after the first is scored
exactly once, each after the first window with at least block_size - stride tokens of context. Memory holds
one chunk and one window.
--dataset: tasks.Dialogue's evaluation of the split's reply tokens, as finetune.py reports them; with
--generate, a reply is generated for each example's source (greedy, or sampled with a seed), --batch_size sources of
similar length at a time (a greedy reply is the one its source gets alone; sampled ones also depend on the batch
size), and scored against the reference by BLEU-1/2/4, Distinct-1/2 and entity precision/recall/F1 (metrics.py);
--replies=FILE writes each source, reference and reply as a JSON line, to read what the model said.
Bits per character = total nats / ln 2 / characters of the scored tokens, which compares models with different
tokenizers. Prints one JSON line.
"""

import codecs
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import check_tokenizer, load_model
from common import DECODING_RULES, autocast_context, check_decoding, data_dir_of, load_meta, resolve_device_and_dtype
from configurator import configure
from prepare.sources import DataError
from prepare.text import reading_for
from tasks import Dialogue, load_task_data

DEFAULTS = dict(
    out_dir='out/tiny',  # a run directory (prompt.pt, best.pt or ckpt.pt in it) ...
    checkpoint='',  # ... or this checkpoint / p-tuning file
    base='',  # a p-tuning file's base checkpoint ('' = the path the file recorded)
    text='',  # score this text file ...
    dataset='',  # ... or the reply tokens of data/<dataset>/ (covid, imcs, dxy, department)
    split='test',
    stride=0,  # tokens a window moves on; 0 = half the block (each token sees half a block or more)
    chunk_bytes=1 << 20,  # bytes of a plain text file tokenized at a time (at most)
    chunk_lines=2000,  # documents of a corpus file tokenized at a time
    documents='',  # .txt only: '' = plain text; 'block', 'line' or 'file' = read as a corpus (see above)
    encoding='',  # the text file's encoding, e.g. latin-1 ('' = detect UTF-8, UTF-16 or GB18030)
    batch_size=8,  # --dataset: examples per batch, scored or (--generate) continued at once
    generate=False,  # --dataset: also generate a reply for each example and score it
    max_examples=0,  # --generate: at most this many examples (0 = all)
    replies='',  # --generate: also write each source, reference and reply to this JSONL file
    max_new_tokens=64,
    temperature=0.0,  # 0 = greedy
    top_k=0,  # 0 = off
    top_p=1.0,  # 1.0 = off
    repetition_penalty=1.0,  # > 1 lowers every token already in the source or reply (1.0 = off), as Hugging Face's
    no_repeat_ngram_size=0,  # > 0: no n-gram of this size appears twice in source + reply (0 = off)
    seed=1337,
    device='auto',
    dtype='auto',
)


def score_text(model, tokens_of_file, tokenizer, stride, autocast):
    """(nats, scored tokens, characters) over the whole file, one window at a time.

    Windows of T + 1 tokens start every `stride` tokens. Each window scores only its last `stride` targets
    (the first window all T): the T - stride before them were scored by the previous window and serve here
    as context only. So every token after the first is scored once, whatever the stride, and each token after
    the first window sees at least T - stride tokens before it: a shorter stride buys context with windows."""
    T = model.config.block_size - model.config.n_prompt
    char_counts = tokenizer.char_counts()
    device = next(model.parameters()).device
    pending = np.zeros(0, dtype=np.int64)  # tokens read but not yet scored, after `context` ones already scored
    nats = tokens = chars = 0.0
    context = 0
    for ids in tokens_of_file:
        pending = np.concatenate([pending, ids])
        while len(pending) > T:  # a full window: T inputs, T targets
            window_nats, n, c = _score_window(model, pending[: T + 1], context, char_counts, device, autocast)
            nats, tokens, chars = nats + window_nats, tokens + n, chars + c
            pending, context = pending[stride:], T - stride  # what this window scored becomes context
    if len(pending) > context + 1:  # the tail: its unscored tokens, with the context before them
        window_nats, n, c = _score_window(model, pending, context, char_counts, device, autocast)
        nats, tokens, chars = nats + window_nats, tokens + n, chars + c
    return nats, tokens, chars


def plain_text_tokens(tokenizer, path, chunk_bytes, encoding):
    """Token chunks of a text file as it is, read in pieces of at most chunk_bytes bytes, so memory is bounded
    on a file of one long line too. A piece is cut after its last newline: only a line longer than a piece is
    ever cut inside (where a token may be split in two). Bytes that are not the encoding are refused by offset."""
    from prepare.corpus import file_encoding

    encoding = file_encoding(path, encoding)
    decoder = codecs.getincrementaldecoder(encoding)()
    with (
        open(path, 'rb') as f,
        tqdm(total=os.path.getsize(path), unit='B', unit_scale=True, desc='score', mininterval=1, disable=None) as bar,
    ):
        carry, offset = '', 0  # text read but not yet tokenized; bytes decoded
        while True:
            data = f.read(chunk_bytes)
            held = len(decoder.getstate()[0])  # bytes of a character the previous piece cut, decoded now
            try:
                text = carry + decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: byte {offset - held + e.start} is not {encoding} ({e.reason}): a "
                    f"damaged or cut file, or give its encoding with --encoding"
                ) from None
            offset += len(data)
            cut = text.rfind('\n') + 1 if data else len(text)  # the end of the file ends the last line
            text, carry = (text[:cut], text[cut:]) if cut else (text, '')
            if text:
                yield np.array(tokenizer.encode(text), dtype=np.int64)
            bar.update(len(data))
            if not data:
                return


def corpus_tokens(tokenizer, path, documents, chunk_docs, encoding):
    """Token chunks of a corpus file read as pretraining reads it: each document, then <eot>."""
    from prepare.corpus import read_corpus_file
    from prepare.sources import Skipped

    chunk, n_docs = [], 0
    for document in read_corpus_file(path, Skipped(), {}, documents or 'block', encoding):
        chunk += tokenizer.encode(document.text) + [tokenizer.eot_id]
        n_docs += 1
        if n_docs % chunk_docs == 0:
            yield np.array(chunk, dtype=np.int64)
            chunk = []
    if chunk:
        yield np.array(chunk, dtype=np.int64)


@torch.no_grad()
def _score_window(model, window, context, char_counts, device, autocast):
    """nats, tokens and characters of the targets of window[:-1] -> window[1:] after the first `context`."""
    idx = torch.from_numpy(window[:-1])[None].to(device)
    targets = torch.from_numpy(window[1:].copy())
    # the first `context` targets were scored by the previous window: here they only condition the rest
    # (scoring them again would count a token twice, and with less context than it had the first time)
    targets[:context] = -1
    targets = targets[None].to(device)
    with autocast:
        _, nats = model.lm_head_loss(model.encode(idx), targets, reduction='sum')
    scored = window[1:][context:]
    return nats.item(), len(scored), int(char_counts[scored].sum())


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    if bool(cfg.text) == bool(cfg.dataset):
        raise SystemExit("give --text=FILE or --dataset=NAME (one of them)")
    if cfg.text and not os.path.isfile(cfg.text):
        raise SystemExit(f"no text file at {cfg.text}")
    if cfg.text and not cfg.text.endswith(('.txt', '.jsonl', '.json', '.csv')):
        raise SystemExit(
            f"{cfg.text}: give a .txt, .jsonl, .json or .csv file (prepare/corpus.py lists the shapes it reads)"
        )
    if cfg.batch_size < 1:
        raise SystemExit(f"--batch_size must be >= 1, not {cfg.batch_size}")
    if cfg.documents not in ('', 'block', 'line', 'file'):
        raise SystemExit(f"--documents must be '', 'block', 'line' or 'file', not {cfg.documents!r}")
    check_decoding(cfg)
    if cfg.replies:
        if not (cfg.generate and cfg.dataset):
            raise SystemExit("--replies writes generated replies: give it with --dataset=NAME --generate")
        replies_folder = os.path.dirname(os.path.abspath(cfg.replies))
        if not os.path.isdir(replies_folder):
            raise SystemExit(f"--replies={cfg.replies}: no folder {replies_folder} to write it in")
    device, dtype, _ = resolve_device_and_dtype(cfg.device, cfg.dtype)
    try:
        model, checkpoint = load_model(cfg.checkpoint or cfg.out_dir, device, base_path=cfg.base or None)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    model.eval()
    autocast = autocast_context(device, dtype)
    result = dict(model=cfg.checkpoint or cfg.out_dir)
    if cfg.text:
        from tokenizer import Tokenizer

        if not checkpoint.get('tokenizer'):
            raise SystemExit(f"{result['model']} carries no tokenizer (an older checkpoint): score it with --dataset")
        T = model.config.block_size - model.config.n_prompt
        stride = cfg.stride or max(T // 2, 1)
        if not 1 <= stride <= T:
            raise SystemExit(f"--stride must be in [1, {T}] (the tokens of one window), not {cfg.stride}")
        tokenizer = Tokenizer.from_bytes(checkpoint['tokenizer']['data'])
        plain = cfg.text.endswith('.txt') and not cfg.documents
        tokens_of_file = (
            plain_text_tokens(tokenizer, cfg.text, cfg.chunk_bytes, cfg.encoding)
            if plain
            else corpus_tokens(tokenizer, cfg.text, cfg.documents, cfg.chunk_lines, cfg.encoding)
        )
        try:
            with reading_for(tokenizer.normalize):  # the corpus readers normalise as the model's tokenizer does
                nats, tokens, chars = score_text(model, tokens_of_file, tokenizer, stride, autocast)
        except DataError as error:
            raise SystemExit(str(error)) from None
        if not tokens:
            raise SystemExit(f"{cfg.text} has fewer than two tokens: nothing to score")
        result.update(
            text=cfg.text,
            tokens=int(tokens),
            chars=int(chars),
            stride=stride,
            loss=nats / tokens,
            ppl=math.exp(min(nats / tokens, 700)),
            bpc=nats / math.log(2) / max(chars, 1),
        )
    else:
        data_dir = data_dir_of(cfg.dataset)
        if checkpoint.get('tokenizer'):
            check_tokenizer(checkpoint['tokenizer'], data_dir, result['model'])
        config = checkpoint.get('config', {})
        # the doctor replies, with the inputs the model was trained on (its tag tables, its prompt's place)
        task = Dialogue(
            SimpleNamespace(
                entity_splice=False,
                n_prompt=model.config.n_prompt,
                prompt_position=config.get('prompt_position', 'prefix'),
                label_template='',
                lexical=bool(model.config.n_lexical),
                entity=bool(model.config.n_entity),
                batch_size=cfg.batch_size,
            )
        )
        task_data = load_task_data(task, vars(model.config), load_meta(data_dir), data_dir, device, dtype)
        if not task_data.inputs[cfg.split]:
            raise SystemExit(f"{data_dir} has no {cfg.split} examples")
        result.update(
            dataset=cfg.dataset,
            split=cfg.split,
            examples=len(task_data.inputs[cfg.split]),
            **task.evaluate(model, task_data.inputs[cfg.split], task_data),
        )
        if cfg.generate:
            examples = task_data.examples[cfg.split][: cfg.max_examples or None]
            result.update(
                task.reply_scores(
                    model,
                    task_data,
                    examples,
                    cfg.max_new_tokens,
                    **{key: getattr(cfg, key) for key in DECODING_RULES},
                    seed=cfg.seed,
                    replies_path=cfg.replies,
                )
            )
    print(json.dumps(result, ensure_ascii=False))
    print(
        '\n'.join(
            f"{key:>18}  {value:.4f}" if isinstance(value, float) else f"{key:>18}  {value}"
            for key, value in result.items()
        )
    )
    return result


if __name__ == '__main__':
    main()
