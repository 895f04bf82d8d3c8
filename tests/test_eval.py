"""eval.py: a text scored in sliding windows gives every token after the first exactly one score, equal to
the model's own loss on the same windows; an example set is scored as finetune.py scores it."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluator  # noqa: E402  (eval.py; `eval` is also a builtin)
import finetune  # noqa: E402
from checkpoint import load_model, save_checkpoint, tokenizer_record  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_finetune import base_path, data_dir, finetune_args, tools  # noqa: E402,F401 (fixtures)

TEXT = '孩子发烧三天了，咳嗽有痰。\n体温多少度？有没有气喘？\n' * 6 + '注意补液，可以吃蒙脱石散。\n'


@pytest.fixture(scope='module')
def run_dir(tools, tmp_path_factory):
    """A tiny model that carries its tokenizer, as train.py writes it."""
    tok, _ = tools
    torch.manual_seed(0)
    model_args = dict(
        block_size=16,
        vocab_size=tok.vocab_size,
        n_layer=1,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        bias=False,
        n_lexical=0,
        n_entity=0,
    )
    folder = tmp_path_factory.mktemp('run')
    save_checkpoint(
        dict(
            model=GPT(GPTConfig(**model_args)).state_dict(),
            model_args=model_args,
            config={},
            tokenizer=tokenizer_record(str(tok.file)),
        ),
        str(folder / 'best.pt'),
    )
    return folder


def test_text_scores_match_the_models_loss_on_the_same_windows(tools, run_dir, tmp_path):
    tok, _ = tools
    path = tmp_path / 'notes.txt'
    path.write_text(TEXT, encoding='utf-8')
    result = evaluator.main([f'--out_dir={run_dir}', f'--text={path}', '--stride=16', '--chunk_lines=3'])
    check_scores(result, np.array(tok.encode(TEXT)), tok, run_dir)


def check_scores(result, ids, tok, run_dir):
    """result is what the model's own loss gives on windows of 16 tokens side by side."""
    assert result['tokens'] == len(ids) - 1  # every token after the first, once
    model, _ = load_model(str(run_dir))
    nats = 0.0
    for start in range(0, len(ids) - 1, 16):  # stride = block: windows side by side
        window = torch.from_numpy(ids[start : start + 17])[None]
        _, loss = model.eval()(window[:, :-1], window[:, 1:])
        nats += loss.item() * (window.size(1) - 1)
    assert result['loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    chars = tok.char_counts()[ids[1:]].sum()
    assert result['bpc'] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)


@pytest.mark.parametrize('stride', [5, 0])  # 0: the default, half the block (8)
def test_overlapping_windows_score_each_token_once_after_the_windows_context(tools, run_dir, tmp_path, stride):
    """Windows of 16 tokens that overlap (stride < 16): the total equals each token's own loss, scored once,
    given the left context its window holds: all tokens before it in the first window, the window's
    16 - stride tokens of context and those before it in its last stride tokens in later windows."""
    tok, _ = tools
    path = tmp_path / 'notes.txt'
    path.write_text(TEXT, encoding='utf-8')
    result = evaluator.main([f'--out_dir={run_dir}', f'--text={path}', f'--stride={stride}', '--chunk_lines=3'])
    stride = stride or 8
    assert result['stride'] == stride
    ids = np.array(tok.encode(TEXT))
    assert len(ids) > 4 * 16  # several overlapping windows and a tail
    model, _ = load_model(str(run_dir))
    model.eval()
    nats = 0.0
    for j in range(1, len(ids)):  # token j, predicted from its window's tokens before it
        start = max(0, math.ceil((j - 16) / stride)) * stride  # the first window whose targets reach j
        logits, _ = model(torch.from_numpy(ids[start:j])[None])
        nats += torch.nn.functional.cross_entropy(logits[0, -1], torch.tensor(ids[j])).item()
    assert result['tokens'] == len(ids) - 1
    assert result['loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert result['bpc'] == pytest.approx(nats / math.log(2) / tok.char_counts()[ids[1:]].sum(), rel=1e-5)


def test_a_corpus_file_is_scored_as_pretraining_writes_it(tools, run_dir, tmp_path):
    from prepare.text import dialogue_text, normalize

    tok, _ = tools
    dialogues = [
        [('病人', '孩子发烧三天了，咳嗽有痰。'), ('医生', '体温多少度？')],
        [('病人', '有没有气喘？'), ('医生', '注意补液，可以吃蒙脱石散。')],
    ] * 3
    path = tmp_path / 'dialogues.jsonl'
    path.write_text(
        ''.join(
            json.dumps([f'{who}：{text}' for who, text in turns], ensure_ascii=False) + '\n' for turns in dialogues
        ),
        encoding='utf-8',
    )
    result = evaluator.main([f'--out_dir={run_dir}', f'--text={path}', '--stride=16', '--chunk_lines=1'])
    # the reader's text: speaker pieces, the text normalised as prepare/ normalises it (full-width comma -> ',')
    speaker = {'病人': 'patient', '医生': 'doctor'}
    texts = [dialogue_text([(speaker[who], normalize(text)) for who, text in turns]) for turns in dialogues]
    assert texts[0] == '<patient>孩子发烧三天了,咳嗽有痰。<doctor>体温多少度?'
    ids = [t for text in texts for t in tok.encode(text) + [tok.eot_id]]
    check_scores(result, np.array(ids), tok, run_dir)
    # a .txt file read as a corpus: one document per line, each followed by <eot>
    lines = tmp_path / 'lines.txt'
    lines.write_text('孩子发烧三天了。\n注意补液。\n', encoding='utf-8')
    by_line = evaluator.main([f'--out_dir={run_dir}', f'--text={lines}', '--documents=line'])
    assert by_line['tokens'] == len(tok.encode('孩子发烧三天了。') + tok.encode('注意补液。')) + 2 - 1


def test_a_bad_corpus_file_is_a_one_line_error_naming_it(run_dir, tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "发热"}\n{"what": 1}\n', encoding='utf-8')
    with pytest.raises(SystemExit, match=rf'{bad}:2'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={bad}'])
    with pytest.raises(SystemExit, match=r'give a \.txt, \.jsonl, \.json or \.csv file'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={ROOT / "README.md"}'])


def test_every_stride_scores_each_token_once(run_dir, tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text(TEXT, encoding='utf-8')
    counts = {evaluator.main([f'--out_dir={run_dir}', f'--text={path}', f'--stride={s}'])['tokens'] for s in (1, 5, 16)}
    assert len(counts) == 1


def test_a_ptuned_run_is_scored_through_its_base(base_path, data_dir, tmp_path):
    out = tmp_path / 'pt'
    trained = finetune.main(finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--max_iters=2'))
    result = evaluator.main([f'--out_dir={out}', f'--dataset={data_dir}', '--split=test'])
    assert result['loss'] == pytest.approx(trained['test_loss'], rel=1e-6)
    assert result['bpc'] == pytest.approx(trained['test_bpc'], rel=1e-6)


def test_bad_options_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(SystemExit, match='give --text=FILE or --dataset=NAME'):
        evaluator.main([f'--out_dir={run_dir}'])
    with pytest.raises(SystemExit, match='no text file at'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "none.txt"}'])
    (tmp_path / 'a.txt').write_text(TEXT, encoding='utf-8')
    with pytest.raises(SystemExit, match=r'--stride must be in \[1, 16\]'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "a.txt"}', '--stride=99'])
    with pytest.raises(SystemExit, match='--batch_size must be >= 1, not 0'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "a.txt"}', '--batch_size=0'])
    with pytest.raises(SystemExit, match='--top_p must be in'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "a.txt"}', '--top_p=0'])
    with pytest.raises(SystemExit, match='--replies writes generated replies'):
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "a.txt"}', f'--replies={tmp_path / "r.jsonl"}'])
    with pytest.raises(SystemExit, match='no folder'):
        evaluator.main(
            [f'--out_dir={run_dir}', '--dataset=covid', '--generate', f'--replies={tmp_path / "none" / "r.jsonl"}']
        )


# ----- generated replies ----------------------------------------------------------------------------


def test_bleu_is_sacrebleus():
    import sacrebleu

    from metrics import bleu

    generated, references = ['孩子发烧要多喝水', '建议查血常规'], ['孩子发烧多喝水', '建议去医院查血常规']
    assert bleu(generated, references, 4) == pytest.approx(
        sacrebleu.corpus_bleu(generated, [references], tokenize='zh').score
    )
    assert bleu(['多喝水'], ['多喝水'], 2) == pytest.approx(100.0)


def test_distinct_by_hand():
    from metrics import distinct

    assert distinct(['发烧发烧', '发烧'], 1) == pytest.approx(2 / 6)  # 发 烧 among 6 characters
    assert distinct(['发烧发烧', '发烧'], 2) == pytest.approx(2 / 4)  # 发烧 烧发 among 发烧 烧发 发烧 发烧


def test_entity_scores_by_hand(tmp_path):
    from metrics import entities_in, entity_scores
    from tagging import Tagger, lexicon_dir

    tagger = Tagger(lexicon_dir(str(ROOT.parent / 'shared' / 'data')))
    assert entities_in('孩子发烧咳嗽,吃了布洛芬凝胶,发烧', tagger) == {'发烧', '咳嗽', '布洛芬凝胶'}
    generated, reference = [{'发烧', '咳嗽'}, {'腹泻'}], [{'发烧'}, {'腹泻', '呕吐'}]
    precision, recall, f1 = entity_scores(generated, reference)
    assert (precision, recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3)) and f1 == pytest.approx(2 / 3)
    assert entity_scores([set()], [{'发烧'}]) == (0.0, 0.0, 0.0)


def test_generated_replies_are_scored_and_seeded(base_path, data_dir):
    args = [f'--checkpoint={base_path}', f'--dataset={data_dir}', '--generate', '--max_new_tokens=6']
    first = evaluator.main(args + ['--temperature=0.9', '--seed=3'])
    assert first['generated'] == first['examples'] > 0
    for key in ('bleu1', 'bleu2', 'bleu4', 'distinct1', 'distinct2', 'entity_precision', 'entity_recall', 'entity_f1'):
        assert math.isfinite(first[key]) and first[key] >= 0, key
    assert 0 < first['distinct1'] <= 1
    assert evaluator.main(args + ['--temperature=0.9', '--seed=3']) == first  # seeded


def test_entity_f1_reads_the_lexicon_the_set_was_tagged_with(tmp_path):
    from reply_entities import tagging_lexicon

    folder = tmp_path / 'elsewhere' / 'medical_lexicon'
    folder.mkdir(parents=True)
    files = [folder / f'{name}.txt' for name in ('symptom', 'disease')]
    for path in files:
        path.write_text('发热\n', encoding='utf-8')
    meta = dict(sources={str(tmp_path / 'covid_dialog_zh' / 'train_data.json'): 'x', **{str(p): 'y' for p in files}})
    assert tagging_lexicon(meta) == str(folder)


# ----- text files of any encoding and any line length ------------------------------------------------


@pytest.mark.parametrize('encoding', ['gb18030', 'utf-16', 'utf-8-sig'])
def test_a_text_file_in_another_encoding_scores_as_its_utf8_copy(run_dir, tmp_path, encoding):
    (tmp_path / 'utf8.txt').write_text(TEXT, encoding='utf-8')
    (tmp_path / 'other.txt').write_bytes(TEXT.encode(encoding))
    utf8, other = (
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / name}', '--chunk_bytes=50'])
        for name in ('utf8.txt', 'other.txt')
    )
    assert (other['tokens'], other['chars'], other['loss']) == (utf8['tokens'], utf8['chars'], utf8['loss'])


@pytest.mark.parametrize(
    'data, words',
    [
        (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'byte 8 is NUL: a binary file'),
        (TEXT.encode('utf-8') + '咳'.encode('utf-8')[:2], f'byte {len(TEXT.encode("utf-8"))} is not utf-8-sig'),
        (TEXT.encode('utf-8') + b'\xff' + TEXT.encode('utf-8'), f'byte {len(TEXT.encode("utf-8"))} is not UTF-8'),
    ],
)
def test_a_binary_or_cut_text_file_is_one_line_naming_the_byte(run_dir, tmp_path, data, words):
    (tmp_path / 'notes.txt').write_bytes(data)
    with pytest.raises(SystemExit) as refused:
        evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "notes.txt"}', '--chunk_bytes=64'])
    line = refused.value.code
    assert isinstance(line, str) and '\n' not in line and str(tmp_path / 'notes.txt') in line, line
    assert words in line and '--encoding' in line, line


def test_a_file_of_one_long_line_is_read_in_bounded_pieces(tools, run_dir, tmp_path):
    tok, _ = tools
    line = TEXT.replace('\n', '') * 20  # no newline at all
    (tmp_path / 'one_line.txt').write_text(line, encoding='utf-8')
    pieces = list(evaluator.plain_text_tokens(tok, str(tmp_path / 'one_line.txt'), 300, ''))
    assert len(pieces) > 10 and max(len(p) for p in pieces) <= 300  # (3 bytes a character: 100 tokens a piece)
    assert np.concatenate(pieces).tolist() == tok.encode(line)  # one character a piece: cut anywhere, the same
    result = evaluator.main([f'--out_dir={run_dir}', f'--text={tmp_path / "one_line.txt"}', '--chunk_bytes=300'])
    assert result['tokens'] == len(tok.encode(line)) - 1


def test_a_truncated_checkpoint_is_named_as_such_with_the_file_to_fall_back_to(run_dir, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    data = (run_dir / 'best.pt').read_bytes()
    (run / 'best.pt').write_bytes(data)
    (run / 'ckpt.pt').write_bytes(data[: len(data) // 2])  # a copy cut short
    (tmp_path / 'notes.txt').write_text(TEXT, encoding='utf-8')
    with pytest.raises(SystemExit) as refused:
        evaluator.main([f'--checkpoint={run / "ckpt.pt"}', f'--text={tmp_path / "notes.txt"}'])
    assert refused.value.code.startswith(f'{run / "ckpt.pt"} is truncated or damaged (')
    assert f'fall back to {run / "best.pt"}' in refused.value.code and 'convert.py' not in refused.value.code


def test_generated_replies_in_batches_are_each_sources_own_in_the_examples_order(
    tools, data_dir, tmp_path, monkeypatch
):
    """eval.py --generate sorts the sources by length into batches of --batch_size: each reply is the one the
    source gets alone (greedy), written in the examples' order. The model reads tags and an infix prompt."""
    import tasks

    tok, _ = tools
    torch.manual_seed(0)
    model_args = dict(
        block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False,
        n_lexical=4, n_entity=2, n_prompt=3,
    )  # fmt: skip
    model = GPT(GPTConfig(**model_args)).eval()
    with torch.no_grad():  # tag tables start at zero, positions small: make them count
        for table in (model.wpe, model.wle, model.wee):
            table.weight.normal_(0, 0.5)
    config = dict(dataset=str(data_dir), prompt_position='infix')
    checkpoint = dict(
        model=model.state_dict(), model_args=model_args, config=config, tokenizer=tokenizer_record(tok.file)
    )
    save_checkpoint(checkpoint, str(tmp_path / 'best.pt'))
    written = []  # the replies eval.py scores, in the order it scores them
    score = tasks.score_replies
    monkeypatch.setattr(
        tasks, 'score_replies', lambda generated, *rest: written.append(generated) or score(generated, *rest)
    )
    args = [f'--checkpoint={tmp_path / "best.pt"}', f'--dataset={data_dir}', '--generate', '--max_new_tokens=20']
    for n in (1, 8):
        evaluator.main(args + [f'--batch_size={n}'])
    # each example's reply, generated here from its source alone
    examples = tasks.load_split(str(data_dir), 'test')
    stops = [tok.eot_id, tok.patient_id, tok.doctor_id]
    alone = []
    for ex in examples:
        x = tasks.Task(SimpleNamespace(entity_splice=False)).question(ex, 64 - 3 - 20, {})
        inputs = {key: torch.from_numpy(x[key])[None] for key in ('idx', 'lexical', 'entity')}
        out = model.generate(
            inputs.pop('idx'), 20, temperature=0, eos_id=stops, prompt_pos=torch.tensor([len(x['idx'])]), **inputs
        )
        alone.append(tok.decode([t for t in out[0, len(x['idx']) :].tolist() if t not in stops]))
    assert len({int(np.argmax(ex['mask'])) for ex in examples}) > 1  # sources of different lengths
    assert len(set(alone)) > 1
    assert written == [alone, alone]
