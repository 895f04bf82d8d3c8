"""
The n-gram reference row of reproduce.py's Table 3: a character Kneser-Ney model (experiments/ngram.py) trained on
data/pretrain's text and scored on the COVID test replies exactly as a GPT without a prompt scores them, in bits
per character; and how much of those replies the training text holds verbatim.
"""

import math
import os
import time
from types import SimpleNamespace

import numpy as np

from common import load_meta
from example_sets import load_split
from experiments.ngram import EOS, KneserNey
from tasks import Dialogue
from tokenizer import Tokenizer


def ngram_training_texts(max_texts, split='train'):
    """The pretraining text as the n-gram sees it: the split's .bin decoded, cut at every special piece. The
    n-gram has no speaker tokens, so each utterance (or book chapter) is one text: it learns how an
    utterance starts and ends, as a test reply is scored from its start to its end marker."""
    tokenizer = Tokenizer.load(os.path.join('data', 'pretrain', 'tokenizer.model'))
    ids = np.fromfile(os.path.join('data', 'pretrain', f'{split}.bin'), dtype=np.uint16)
    pieces = np.split(ids, np.flatnonzero(np.isin(ids, tokenizer.special_ids)))
    texts = [tokenizer.decode(p[1:] if p[0] in tokenizer.special_ids else p) for p in pieces if len(p)]
    texts = [t for t in texts if t]
    return texts[: max_texts or None]


def scored_replies(room):
    """The COVID test replies exactly as a GPT without a prompt scores them: (text, whether <eot> is scored),
    each reply cut where the GPT's window cuts it."""
    data_dir = os.path.join('data', 'covid')
    tokenizer = Tokenizer.load(os.path.join(data_dir, 'tokenizer.model'))
    special = load_meta(data_dir)['special_ids']
    task = Dialogue(SimpleNamespace(entity_splice=False))
    replies = []
    for ex in load_split(data_dir, 'test'):
        targets = task.inputs(ex, room, special)['targets']
        scored = targets[targets != -1].tolist()
        ends = scored[-1] == special['eot']
        replies.append((tokenizer.decode(scored[:-1] if ends else scored), ends))
    return replies


def reply_bits(model, text, scores_end):
    """Bits the n-gram spends on a reply: each character given the reply so far, then the end marker
    where the GPT scores its <eot>."""
    chars = list(text) + ([EOS] if scores_end else [])
    return -sum(model.log_prob(text[:i], char) for i, char in enumerate(chars)) / math.log(2)


def ngram_result(order, room, max_texts):
    """The reference row: bits per character of the COVID test replies (per character of reply text, the
    end markers' bits included, as the GPT's bits/char counts its <eot>)."""
    t0 = time.time()
    texts = ngram_training_texts(max_texts)
    model = KneserNey(order).fit(texts)
    replies = scored_replies(room)
    bits = sum(reply_bits(model, text, ends) for text, ends in replies)
    n_chars = sum(len(text) for text, _ in replies)
    return dict(
        ngram=order,
        train_texts=len(texts),
        train_chars=sum(map(len, texts)),
        test_replies=len(replies),
        test_chars=n_chars,
        test_bpc=bits / n_chars,
        test_ppl=None,
        trainable_params=None,
        ngrams=len(model.counts[order]),
        seen_fraction=seen_fraction(replies, texts),
        wall_time_s=round(time.time() - t0, 1),
    )


def seen_fraction(replies, texts, width=12):
    """The share of the replies' consecutive width-character pieces found verbatim in the training text: how
    much of the test set an n-gram can simply remember."""
    corpus = '\n'.join(texts)
    pieces = [text[i : i + width] for text, _ in replies for i in range(0, len(text) - width + 1, width)]
    return sum(piece in corpus for piece in pieces) / max(len(pieces), 1)
