"""Generation in batches: rows of different lengths, left-padded (model.generate's left_pad), get token for token
the replies each would get alone, whatever the prompt, tags, cache, attention, stops and cropping."""

import pytest
import torch

from model import GPT, GPTConfig, penalize_repeats

PAD_ID = 3  # an id the padding carries; it must not matter which


def make_model(attention='manual', n_prompt=0, block_size=32):
    """A small random model in float64, so that greedy choices never hinge on rounding (a batch sums in another
    order than a single row)."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=40, block_size=block_size, n_layer=2, n_head=2, n_embd=16, n_lexical=4, n_entity=2,
        n_prompt=n_prompt, attention=attention,
    )  # fmt: skip
    model = GPT(config).double().eval()
    with torch.no_grad():  # tag tables start at zero, positions small: make them count
        for table in (model.wpe, model.wle, model.wee):
            table.weight.normal_(0, 0.5)
    return model


def random_rows(lengths, seed=1):
    """One (tokens, lexical, entity) per length."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, high, (n,), generator=g) for high in (40, 4, 2)) for n in lengths]


def reply(ids, stops):
    """The generated ids up to and with the first stop id (a finished row of a batch repeats it)."""
    ids = ids.tolist()
    ends = [i for i, t in enumerate(ids) if t in stops]
    return ids[: ends[0] + 1] if ends else ids


def alone(model, rows, prompt_pos, stops, **kwargs):
    """Each row's reply, generated in a batch of one. prompt_pos: per row, in the row's own coordinates."""
    replies = []
    for (tokens, lexical, entity), pos in zip(rows, prompt_pos):
        pos = None if pos is None else torch.tensor([pos])
        out = model.generate(tokens[None], lexical=lexical[None], entity=entity[None], prompt_pos=pos, **kwargs)
        replies.append(reply(out[0, len(tokens) :], stops))
    return replies


def batched(model, rows, prompt_pos, stops, **kwargs):
    """The rows' replies, generated in one batch: each row left-padded to the longest."""
    T = max(len(tokens) for tokens, _, _ in rows)
    left_pad = torch.tensor([T - len(tokens) for tokens, _, _ in rows])
    idx, lexical, entity = (
        torch.stack([torch.cat([torch.full((p,), fill), row[i]]) for row, p in zip(rows, left_pad.tolist())])
        for i, fill in ((0, PAD_ID), (1, 1), (2, 1))
    )  # padding's tags: anything
    pos = None if prompt_pos[0] is None else left_pad + torch.tensor(prompt_pos)  # in the batch's coordinates
    out = model.generate(idx, lexical=lexical, entity=entity, prompt_pos=pos, left_pad=left_pad, **kwargs)
    return [reply(row[T:], stops) for row in out]


@pytest.mark.parametrize('use_cache', [True, False])
@pytest.mark.parametrize('attention', ['manual', 'fused'])
@pytest.mark.parametrize('prompt', ['none', 'prefix', 'infix'])
def test_batch_replies_equal_single_replies(prompt, attention, use_cache):
    model = make_model(attention, n_prompt=0 if prompt == 'none' else 4)
    lengths = [5, 12, 3, 20]
    rows = random_rows(lengths)
    # the infix prompt between source and reply (the tasks' place), or inside the source
    prompt_pos = [n if i % 2 else n // 2 for i, n in enumerate(lengths)] if prompt == 'infix' else [None] * 4
    # 20 + 16 tokens pass the 28 beside a prompt: the longer rows are cropped, the shortest never
    kwargs = dict(max_new_tokens=16, temperature=0, use_cache=use_cache)
    single = alone(model, rows, prompt_pos, (), **kwargs)
    assert all(len(r) == 16 for r in single)
    assert batched(model, rows, prompt_pos, (), **kwargs) == single
    # rows that stop at different lengths: each row's stop is a token of its own greedy reply
    stops = [single[0][2], single[1][9]]
    single = alone(model, rows, prompt_pos, stops, eos_id=stops, **kwargs)
    assert len({len(r) for r in single}) > 1
    assert batched(model, rows, prompt_pos, stops, eos_id=stops, **kwargs) == single


@pytest.mark.parametrize('use_cache', [True, False])
def test_batch_replies_with_rules_against_loops(use_cache):
    model = make_model('fused', n_prompt=4)
    rows = random_rows([4, 9, 2], seed=2)
    kwargs = dict(max_new_tokens=30, temperature=0, use_cache=use_cache, repetition_penalty=1.5)
    for n in (0, 2):
        single = alone(model, rows, [None] * 3, (), no_repeat_ngram_size=n, **kwargs)
        assert batched(model, rows, [None] * 3, (), no_repeat_ngram_size=n, **kwargs) == single


def test_padding_is_no_seen_token():
    """penalize_repeats with left_pad: a padded row is penalised exactly as the row alone."""
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([5, 6, 7, 5])
    padded = torch.tensor([[9, 9, 5, 6, 7, 5], [1, 2, 3, 4, 5, 6]])  # row 0: padding of ids the row lacks
    logits = torch.randn(2, 10, generator=g)
    for options in (dict(repetition_penalty=1.7), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=4)):
        ours = penalize_repeats(logits, padded, left_pad=torch.tensor([2, 0]), **options)
        assert torch.equal(ours[0], penalize_repeats(logits[:1], row[None], **options)[0]), options
        assert torch.equal(ours[1], penalize_repeats(logits[1:], padded[1:], **options)[0]), options


def test_no_padding_is_the_plain_batch():
    model = make_model('fused', n_prompt=4)
    idx = torch.stack([tokens for tokens, _, _ in random_rows([7, 7])])
    plain = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, temperature=0, left_pad=torch.zeros(2, dtype=torch.long)), plain)


def test_left_pad_must_leave_a_token():
    model = make_model()
    with pytest.raises(ValueError, match='left_pad'):
        model.generate(torch.zeros(2, 4, dtype=torch.long), 2, left_pad=torch.tensor([0, 4]))
