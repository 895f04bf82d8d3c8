"""The decoding rules against loops (repetition_penalty, no_repeat_ngram_size): by hand on small cases, against
the transformers library's own logits processors, and inside generate()."""

import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from model import GPT, GPTConfig, penalize_repeats


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = penalize_repeats(logits, torch.tensor([[0, 1, 1]]), repetition_penalty=2.0)
    # seen tokens 0 (positive: halved) and 1 (negative: doubled); the others untouched
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_no_repeat_ngram_by_hand():
    logits = torch.zeros(3, 10)
    idx = torch.tensor(
        [
            [5, 6, 7, 5],  # "5 6" was seen and the sequence ends in 5: 6 is banned
            [1, 2, 3, 1],  # "1 2": 2 is banned
            [4, 4, 8, 9],
        ]
    )  # "9 x" never seen: nothing banned
    out = penalize_repeats(logits, idx, no_repeat_ngram_size=2)
    assert torch.isinf(out).nonzero().tolist() == [[0, 6], [1, 2]]
    out3 = penalize_repeats(torch.zeros(1, 10), torch.tensor([[1, 2, 3, 1, 2]]), no_repeat_ngram_size=3)
    assert torch.isinf(out3).nonzero().tolist() == [[0, 3]]
    # shorter than n: nothing to repeat yet
    assert not torch.isinf(penalize_repeats(torch.zeros(1, 10), torch.tensor([[1, 2]]), no_repeat_ngram_size=3)).any()


def test_same_as_transformers_processors():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        idx = torch.randint(0, 6, (3, 12), generator=g)  # a small vocabulary: many repeats
        logits = torch.randn(3, 6, generator=g) * 3
        for penalty in (1.3, 0.8):
            ours = penalize_repeats(logits, idx, repetition_penalty=penalty)
            theirs = RepetitionPenaltyLogitsProcessor(penalty)(idx, logits.clone())
            torch.testing.assert_close(ours, theirs)
        for n in (1, 2, 3, 4):
            ours = penalize_repeats(logits, idx, no_repeat_ngram_size=n)
            theirs = NoRepeatNGramLogitsProcessor(n)(idx, logits.clone())
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (trial, n)
            torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_generate_never_repeats_an_ngram():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.tensor([[1, 2, 3]])
    plain = model.generate(idx, 30, temperature=0)[0].tolist()
    bigrams = list(zip(plain, plain[1:]))
    assert len(set(bigrams)) < len(bigrams)  # greedy on a random model loops
    for use_cache in (True, False):
        out = model.generate(idx, 30, temperature=0, no_repeat_ngram_size=2, use_cache=use_cache)[0].tolist()
        bigrams = list(zip(out, out[1:]))
        assert len(set(bigrams)) == len(bigrams)
    # a penalty changes greedy decoding only through the logits: 1.0 is exactly the plain decoding
    assert model.generate(idx, 30, temperature=0, repetition_penalty=1.0)[0].tolist() == plain
    assert model.generate(idx, 30, temperature=0, repetition_penalty=5.0)[0].tolist() != plain


def test_reply_variety():
    from metrics import reply_variety

    replies = ['宝宝吗?'] * 7 + ['多喝水', '去医院']
    variety = reply_variety(replies)
    assert variety == {'distinct_replies': 3 / 9, 'top_reply_share': 7 / 9}
    assert reply_variety([]) == {'distinct_replies': 0.0, 'top_reply_share': 0.0}
