import math
import random

import pytest

from experiments.ngram import EOS, FALLBACK_DISCOUNTS, KneserNey, modified_kn_discounts

UNSEEN = '\U00020000'  # a CJK character that no corpus below contains

SYMPTOMS = ['发热', '咳嗽', '咽痛', '乏力', '胸闷', '腹泻', '头痛', '气短']
SENTENCES = [
    '病人：{}{}天了，还有点{}。',
    '医生：有没有{}或者{}？',
    '病人：没有{}，体温三十八度。',
    '医生：建议去医院查血常规和胸部CT。',
    '病人：{}需要吃什么药吗？',
    '医生：先多喝水，注意休息。',
    '病人：我姓{}。',
]
SURNAMES = '王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董'  # rare characters


def synthetic_corpus(n_texts=300, seed=0):
    """Dialogue-like texts: sentences with random symptoms, so that n-grams repeat unevenly."""
    rng = random.Random(seed)
    days = '一二三四五六七八九十'

    def sentence():
        template = rng.choice(SENTENCES)
        fillers = [rng.choice(SYMPTOMS) for _ in range(template.count('{}'))]
        if template.startswith('病人：{}{}'):
            fillers[1] = rng.choice(days)
        if template.startswith('病人：我姓'):
            fillers[0] = rng.choice(SURNAMES)
        return template.format(*fillers)

    return [''.join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(n_texts)]


def prob(model, context, char):
    return math.exp(model.log_prob(context, char))


@pytest.mark.parametrize('order', [1, 2, 3, 5])
def test_probabilities_sum_to_one(order):
    model = KneserNey(order).fit(synthetic_corpus())
    # the closed-form discounts, not only the fallback, must be exercised here
    assert any(d[1:] != FALLBACK_DISCOUNTS for d in model.discounts[1:])
    contexts = ['', '病人：', '医生：体温多', '有没有胸闷气', '胸闷胸闷', 'xyz', UNSEEN * 4, '发热' + UNSEEN]
    for context in contexts:
        total = sum(prob(model, context, w) for w in model.vocab) + prob(model, context, UNSEEN)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_discounts_follow_chen_goodman():
    # Y = 10 / (10 + 2*5) = 0.5; D1 = 1 - 2Y*5/10 = 0.5; D2 = 2 - 3Y*3/5 = 1.1; D3+ = 3 - 4Y*2/3 = 5/3
    assert modified_kn_discounts(10, 5, 3, 2) == pytest.approx((0.5, 1.1, 5 / 3))
    assert modified_kn_discounts(10, 5, 0, 2) == FALLBACK_DISCOUNTS  # no count-3 n-grams
    assert modified_kn_discounts(1, 1, 100, 1) == FALLBACK_DISCOUNTS  # D2 would be negative


def test_hand_computed_bigram():
    # Texts 'aab' and 'ab' with order 2 are, with markers, ^aab$ and ^ab$ (^ = BOS, $ = EOS).
    # Bigram counts: ^a 2, aa 1, ab 2, b$ 2. Count-of-counts (1, 3, 0, 0) -> fallback D = .5, 1, 1.5.
    # Unigram continuation counts (distinct left neighbours): a 2 (^, a), b 1 (a), $ 1 (b);
    # count-of-counts (2, 1, 0, 0) -> fallback too. Vocabulary {a, b, $} + unseen slot: uniform 1/4.
    # Unigram: total 4, freed = .5*2 (b, $) + 1*1 (a) = 2, so P1(b) = (1 - .5)/4 + (2/4)(1/4) = 1/4.
    # Context a: total 3 (aa 1, ab 2), freed = .5 + 1 = 1.5, so
    # P(b | a) = (2 - 1)/3 + (1.5/3) * P1(b) = 1/3 + 1/8 = 11/24.
    model = KneserNey(2).fit(['aab', 'ab'])
    assert prob(model, 'a', 'b') == pytest.approx(11 / 24, abs=1e-12)
    # and P(a | start) = (2 - 1)/2 + (1/2) * P1(a), P1(a) = (2 - 1)/4 + 1/8 = 3/8, so 11/16
    assert prob(model, '', 'a') == pytest.approx(11 / 16, abs=1e-12)


def test_document_starts_keep_plain_counts():
    # Order 3 on 'ab' x 3 and 'c': ^^ab$ three times and ^^c$. A lower-order string that starts
    # with ^ has only ^ before it, so its continuation count would be 1 whatever its count is;
    # it keeps the plain count instead: ^a 3, ^c 1 (and ab 1, b$ 1, c$ 1 by continuation).
    # All three orders lack some count-of-count, so D = .5, 1, 1.5. Vocabulary {a, b, c, $} + 1.
    # Unigram continuation counts: a 1, b 1, c 1, $ 2 (b, c); total 5, freed 2.5, so
    # P1(a) = (1 - .5)/5 + (2.5/5)(1/5) = 0.2.   P2(a | ^) = (3 - 1.5)/4 + (2/4) 0.2 = 0.475.
    # P3(a | ^^) = (3 - 1.5)/4 + (2/4) 0.475 = 0.6125   (with continuation counts at ^: 0.55).
    model = KneserNey(3).fit(['ab'] * 3 + ['c'])
    assert prob(model, '', 'a') == pytest.approx(0.6125, abs=1e-12)


def test_higher_order_fits_repetitive_text_better():
    texts = ['发热咳嗽三天，' * 30]
    unigram_bpc, _ = KneserNey(1).fit(texts).bits_per_char(texts)
    fourgram_bpc, _ = KneserNey(4).fit(texts).bits_per_char(texts)
    # seven characters in turn: a unigram needs about log2(8) bits each, a 4-gram almost none
    assert unigram_bpc > 2.5
    assert fourgram_bpc < 0.5


def test_unseen_character_gets_positive_probability():
    model = KneserNey(3).fit(synthetic_corpus())
    for context in ['', '病人：发', UNSEEN]:
        assert prob(model, context, UNSEEN) > 0
    bpc, n_chars = model.bits_per_char(['发热' + UNSEEN + '三天'])
    assert math.isfinite(bpc) and n_chars == 6


def test_contexts_do_not_cross_documents():
    model = KneserNey(2).fit(['ab'] * 10)
    # joined into one stream, 'b' would be followed by 'a' nine times in ten
    assert prob(model, 'b', EOS) > 0.5
    assert prob(model, 'b', 'a') < 0.1
    assert prob(model, '', 'a') > 0.5


def test_training_text_scores_better_than_shuffled():
    texts = synthetic_corpus()
    model = KneserNey(5).fit(texts)
    rng = random.Random(1)
    shuffled = [''.join(rng.sample(text, len(text))) for text in texts]
    train_bpc, n_chars = model.bits_per_char(texts)
    shuffled_bpc, _ = model.bits_per_char(shuffled)
    assert n_chars == sum(len(text) + 1 for text in texts)  # the end markers are scored too
    assert train_bpc < 1.0 < 3.0 < shuffled_bpc
