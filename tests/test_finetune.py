"""Tests of finetune.py and sample.py on a small example set written here (hand-made dialogues,
tagged by prepare's tagger with the real medical lexicon) and a tiny base checkpoint."""

import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import finetune
import sample
import tasks
from checkpoint import fingerprint, load_checkpoint, load_model, save_checkpoint, tokenizer_record
from metrics import macro_f1
from model import GPT, GPTConfig
from prepare.dataset import cut_examples, write_examples
from prepare.text import normalize
from tagging import LEXICAL_MAP, Tagger, entity_map, lexicon_dir
from tokenizer import train_char

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
DIALOGUES = [
    (
        [
            ('patient', '孩子发烧三天了，咳嗽有痰。'),
            ('doctor', '体温多少度？有没有气喘？'),
            ('patient', '三十八度五，没有气喘。'),
            ('doctor', '可能是上呼吸道感染，多喝水，观察体温。'),
        ],
        0,
    ),
    (
        [
            ('patient', '最近总是头痛，晚上睡不好。'),
            ('doctor', '头痛多久了？血压高吗？'),
            ('patient', '两周了，血压正常。'),
            ('doctor', '建议做头颅检查，注意休息。'),
        ],
        1,
    ),
    (
        [
            ('patient', '腹泻两天，一天五六次。'),
            ('doctor', '有没有发烧？大便什么样？'),
            ('patient', '不发烧，稀水样。'),
            ('doctor', '注意补液，可以吃蒙脱石散。'),
        ],
        2,
    ),
    (
        [
            ('patient', '皮肤起了很多红疹，很痒。'),
            ('doctor', '吃过什么特别的东西吗？'),
            ('patient', '昨天吃了海鲜。'),
            ('doctor', '可能是过敏，可以吃氯雷他定。'),
        ],
        0,
    ),
]
LABELS = ['呼吸科', '神经科', '消化科']


def dialogue(turns):
    return ''.join(f'<{speaker}>{text}' for speaker, text in turns) + '<eot>'


@pytest.fixture(scope='module')
def tools(tmp_path_factory):
    os.environ.setdefault('CMED_DATA', os.path.abspath(SHARED))
    folder = tmp_path_factory.mktemp('tok')
    texts = [text for turns, _ in DIALOGUES for _, text in turns] + [f'这属于{n}。' for n in LABELS]
    tok = train_char(texts, str(folder / 'tokenizer.model'), vocab_size=400)
    tok.file = folder / 'tokenizer.model'
    return tok, Tagger(lexicon_dir())


@pytest.fixture(scope='module')
def data_dir(tools, tmp_path_factory):
    """An example set in prepare's format: every dialogue in every split (small, but real bytes)."""
    tok, tagger = tools
    folder = tmp_path_factory.mktemp('data')
    for split in ('train', 'val', 'test'):
        examples = []
        for turns, label in DIALOGUES:
            ids, lexical, entity = tagger.encode(tok, dialogue(turns)[: -len('<eot>')])
            examples += cut_examples(ids, lexical, entity, tok, label)
        write_examples(str(folder), split, examples)
    shutil.copy(tok.file, folder / 'tokenizer.model')
    meta = dict(
        vocab_size=tok.vocab_size,
        special_ids=dict(patient=tok.patient_id, doctor=tok.doctor_id, sep=tok.sep_id, eot=tok.eot_id),
        lexical_map=LEXICAL_MAP,
        entity_map=entity_map(),
        label_names=LABELS,
    )
    (folder / 'meta.json').write_text(json.dumps(meta, ensure_ascii=False), encoding='utf-8')
    return folder


@pytest.fixture(scope='module')
def base_path(tools, data_dir, tmp_path_factory):
    tok, _ = tools
    torch.manual_seed(0)
    model_args = dict(
        block_size=96,
        vocab_size=tok.vocab_size,
        n_layer=1,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        bias=False,
        n_lexical=0,
        n_entity=0,
    )
    path = tmp_path_factory.mktemp('base') / 'best.pt'
    save_checkpoint(
        dict(
            model=GPT(GPTConfig(**model_args)).state_dict(),
            model_args=model_args,
            config=dict(dataset=str(data_dir)),
            tokenizer=tokenizer_record(tok.file),
        ),
        str(path),
    )
    return path


def config(**overrides):
    return SimpleNamespace(**dict(finetune.DEFAULTS, **overrides))


def task_of(**overrides):
    """The task finetune.py runs on these settings."""
    cfg = config(**overrides)
    return tasks.TASKS[cfg.task](cfg)


def finetune_args(base_path, data_dir, out_dir, *extra):
    return [
        f'--init_from={base_path.parent}',
        f'--dataset={data_dir}',
        f'--out_dir={out_dir}',
        '--max_iters=4',
        '--batch_size=2',
        '--eval_interval=2',
        '--warmup_iters=1',
        '--seed=1',
        *extra,
    ]


# ----- building inputs -------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_reply(tools, data_dir):
    tok, _ = tools
    examples = tasks.load_split(str(data_dir), 'train')
    special = dict(sep=tok.sep_id, eot=tok.eot_id)
    second_reply = examples[1]  # dialogue 0, the doctor's second turn, with the whole history as source
    x = task_of().inputs(second_reply, 200, special)
    scored = x['targets'][x['targets'] != -1]
    assert tok.decode(scored.tolist()) == normalize('可能是上呼吸道感染，多喝水，观察体温。<eot>')
    first_scored = np.flatnonzero(x['targets'] != -1)[0]
    assert x['idx'][first_scored] == tok.doctor_id  # the reply is predicted from the doctor's speaker piece on
    assert tok.decode(x['idx'][: first_scored + 1].tolist()) == normalize(
        '<patient>孩子发烧三天了，咳嗽有痰。<doctor>体温多少度？有没有气喘？<patient>三十八度五，没有气喘。<doctor>'
    )
    assert x['prompt_pos'] == first_scored + 1 and x['class_pos'] == first_scored


def test_crop_keeps_the_target_and_the_newest_source():
    assert tasks.crop_window(50, 30, 60) == (0, 50)
    assert tasks.crop_window(50, 30, 40) == (10, 50)  # 10 oldest source tokens go
    assert tasks.crop_window(100, 30, 40) == (10, 50)  # a long target: source keeps half the window
    assert tasks.crop_window(100, 5, 40) == (0, 40)


def test_cropped_example_still_scores_only_reply_tokens(tools, data_dir):
    tok, _ = tools
    ex = tasks.load_split(str(data_dir), 'train')[1]  # a 20-token reply after a 45-token history
    special = dict(sep=tok.sep_id, eot=tok.eot_id)
    reply = normalize('可能是上呼吸道感染，多喝水，观察体温。<eot>')
    x = task_of().inputs(ex, 40, special)  # room for the whole reply: the history is cropped
    assert len(x['idx']) == 40
    assert tok.decode(x['targets'][x['targets'] != -1].tolist()) == reply
    # too little room: a window of 31 tokens keeps half for the history (15) and the reply's first 16
    x = task_of().inputs(ex, 30, special)
    scored = tok.decode(x['targets'][x['targets'] != -1].tolist())
    assert len(x['idx']) == 30 and reply.startswith(scored) and len(scored) == 16


def test_classify_input_is_the_question_alone(tools, data_dir):
    tok, _ = tools
    ex = tasks.load_split(str(data_dir), 'train')[0]
    x = task_of(task='classify').inputs(ex, 200, dict(sep=tok.sep_id, eot=tok.eot_id))
    assert tok.decode(x['idx'].tolist()) == normalize('<patient>孩子发烧三天了，咳嗽有痰。<doctor>')
    assert x['targets'] is None and x['class_pos'] == len(x['idx']) - 1 and x['label'] == 0


def test_entity_splice_appends_entity_words_before_the_doctor_piece(tools, data_dir):
    tok, _ = tools
    ex = tasks.load_split(str(data_dir), 'train')[0]
    x = task_of(entity_splice=True).inputs(ex, 200, dict(sep=tok.sep_id, eot=tok.eot_id))
    source = tok.decode(x['idx'][: x['prompt_pos']].tolist())
    # the lexicon's symptoms in the question (the reply's 气喘 is not the source's to use)
    assert source == normalize('<patient>孩子发烧三天了，咳嗽有痰。<sep>发烧<sep>咳嗽<doctor>')
    assert tok.decode(x['targets'][x['targets'] != -1].tolist()) == normalize('体温多少度？有没有气喘？<eot>')


def test_label_text_target_is_the_label_sentence(tools, data_dir):
    tok, _ = tools
    ex = tasks.load_split(str(data_dir), 'train')[2]  # dialogue 1, first doctor turn: label 1
    label_sentences = [tok.encode(f'这属于{name}。') for name in LABELS]
    x = task_of(task='label_text').inputs(ex, 200, dict(sep=tok.sep_id, eot=tok.eot_id), label_sentences)
    assert tok.decode(x['targets'][x['targets'] != -1].tolist()) == normalize('这属于神经科。<eot>')


def test_macro_f1_by_hand():
    # class 0: precision 1/1, recall 1/2 -> F1 2/3; class 1: precision 1/2, recall 1/1 -> 2/3;
    # class 2: its one example predicted as no class (-1) -> 0. Macro: (2/3 + 2/3 + 0) / 3 = 4/9
    assert macro_f1([0, 1, 1, -1], [0, 0, 1, 2]) == pytest.approx(4 / 9)


# ----- model building and losses ------------------------------------------------------------------------


def test_new_zero_tables_leave_the_base_unchanged(tools, data_dir, base_path):
    tok, _ = tools
    base = load_checkpoint(str(base_path))
    meta = json.loads((data_dir / 'meta.json').read_text(encoding='utf-8'))
    model, args = finetune.build_model(config(lexical=True, entity=True, task='multitask', dropout=0.0), base, meta)
    assert args['n_lexical'] == 4 and args['n_entity'] == 2 and args['n_classes'] == 3
    plain = GPT(GPTConfig(**base['model_args']))
    plain.load_state_dict(base['model'])
    ex = tasks.load_split(str(data_dir), 'train')[0]
    idx = torch.from_numpy(ex['tokens'])[None]
    tags = dict(lexical=torch.from_numpy(ex['lexical'])[None], entity=torch.from_numpy(ex['entity'])[None])
    assert tags['lexical'].any() and tags['entity'].any()
    assert torch.equal(model.eval()(idx, all_logits=True, **tags)[0], plain.eval()(idx, all_logits=True)[0])


def test_multitask_loss_is_the_weighted_sum(tools, data_dir, base_path):
    tok, _ = tools
    base = load_checkpoint(str(base_path))
    meta = json.loads((data_dir / 'meta.json').read_text(encoding='utf-8'))
    cfg = config(task='multitask', lambda_lm=0.3)
    model, _ = finetune.build_model(cfg, base, meta)
    model.eval()
    examples = [ex for ex in tasks.load_split(str(data_dir), 'train') if ex['label'] >= 0]
    task = tasks.TASKS['multitask'](cfg)
    inputs = [task.inputs(ex, 96, dict(sep=tok.sep_id, eot=tok.eot_id)) for ex in examples]
    batch = task.collate(inputs, tok.eot_id, 'cpu')
    loss, lm_loss, class_loss = task.loss(model, batch)
    _, lm_alone = model(batch['idx'], targets=batch['targets'])
    _, class_alone = model.classify(model.encode(batch['idx']), batch['class_pos'], batch['labels'])
    assert torch.allclose(lm_loss, lm_alone) and torch.allclose(class_loss, class_alone)
    assert torch.allclose(loss, class_alone + 0.3 * lm_alone)


@pytest.mark.parametrize('task_name', list(tasks.TASKS))
def test_the_number_that_picks_the_best_model_is_the_training_loss_on_val(data_dir, base_path, task_name):
    base = load_checkpoint(str(base_path))
    meta = json.loads((data_dir / 'meta.json').read_text(encoding='utf-8'))
    cfg = config(task=task_name, lambda_lm=0.3, dropout=0.0, batch_size=64, lexical=True, entity=True)
    model, model_args = finetune.build_model(cfg, base, meta)
    task = tasks.TASKS[task_name](cfg)
    task_data = tasks.load_task_data(task, model_args, meta, str(data_dir), 'cpu', 'float32')
    inputs = task_data.inputs['val']
    assert len(inputs) <= cfg.batch_size  # evaluate sees them in one batch, as the loss does here
    metrics = task.evaluate(model, inputs, task_data)
    loss, _, _ = task.loss(model.eval(), task.collate(inputs, task_data.pad_id, 'cpu'))
    assert task.selection_loss(metrics) == pytest.approx(loss.item(), rel=1e-5)


def test_an_infix_prompt_sits_after_each_source_and_a_prefix_prompt_needs_no_position(tools, data_dir):
    tok, _ = tools
    special = dict(sep=tok.sep_id, eot=tok.eot_id)
    examples = tasks.load_split(str(data_dir), 'train')[:2]  # a first and a second doctor turn
    infix = task_of(mode='ptune', n_prompt=2, prompt_position='infix')
    inputs = [infix.inputs(ex, 200, special) for ex in examples]
    batch = infix.collate(inputs, tok.eot_id, 'cpu')
    sources = [int(np.argmax(ex['mask'])) for ex in examples]  # the source's length: the prompt goes after it
    assert batch['prompt_pos'].tolist() == sources and sources[0] < sources[1]
    prefix = task_of(mode='ptune', n_prompt=2)
    assert 'prompt_pos' not in prefix.collate(inputs, tok.eot_id, 'cpu')


# ----- whole runs -------------------------------------------------------------------------------------


def test_ptuning_run_trains_only_the_prompt_and_round_trips(base_path, data_dir, tmp_path):
    out = tmp_path / 'pt'
    result = finetune.main(
        finetune_args(
            base_path,
            data_dir,
            out,
            '--mode=ptune',
            '--n_prompt=3',
            '--prompt_position=infix',
            '--lexical',
            '--prompt_reparam=mlp',
        )
    )
    assert result['trainable_params'] < result['total_params']
    assert np.isfinite([result['test_loss'], result['test_ppl'], result['test_bpc']]).all()
    saved = load_checkpoint(str(out / 'prompt.pt'), required_keys=('trained',))
    assert set(saved['trained']) == {
        'prompt.embedding',
        'prompt.mlp.0.weight',
        'prompt.mlp.0.bias',
        'prompt.mlp.2.weight',
        'prompt.mlp.2.bias',
        'wle.weight',
    }
    model, _ = load_model(str(out))
    base = load_checkpoint(str(base_path))
    state = model.state_dict()
    for name, tensor in base['model'].items():  # frozen: bit-identical to the base
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(saved['trained']['wle.weight'], torch.zeros_like(saved['trained']['wle.weight']))
    line = json.loads((out / 'results.jsonl').read_text(encoding='utf-8').splitlines()[-1])
    assert line['mode'] == 'ptune' and line['test_loss'] == result['test_loss']


def test_ptuning_file_refuses_another_base(base_path, data_dir, tmp_path):
    out = tmp_path / 'pt'
    finetune.main(finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--max_iters=1'))
    other = load_checkpoint(str(base_path))
    other['model']['ln_f.weight'] = other['model']['ln_f.weight'] + 1e-3
    other_path = tmp_path / 'other.pt'
    save_checkpoint(other, str(other_path))
    assert fingerprint(other['model']) != fingerprint(load_checkpoint(str(base_path))['model'])
    with pytest.raises(ValueError, match='different base model'):
        load_model(str(out / 'prompt.pt'), base_path=str(other_path))


@pytest.mark.parametrize('task', ['classify', 'multitask', 'label_text'])
def test_classification_runs_report_accuracy(tools, base_path, data_dir, tmp_path, task):
    result = finetune.main(finetune_args(base_path, data_dir, tmp_path / task, f'--task={task}'))
    assert ('test_loss' in result) == (task != 'classify')
    assert result['trainable_params'] == result['total_params']
    # the reported accuracy and F1 are those of the saved model, predicted here by hand from each question
    tok, _ = tools
    model, _ = load_model(str(tmp_path / task))
    model.eval()
    sentences = [f'这属于{name}。' for name in LABELS]
    predictions, labels = [], []
    for ex in tasks.load_split(str(data_dir), 'test'):
        if ex['label'] < 0:
            continue
        question = torch.from_numpy(ex['tokens'][: int(np.argmax(ex['mask']))])[None]  # (1, T): up to <doctor>
        if task == 'label_text':
            out = model.generate(question, 8, temperature=0, eos_id=tok.eot_id)
            text = tok.decode([t for t in out[0, question.size(1) :].tolist() if t != tok.eot_id])
            predictions.append(sentences.index(text) if text in sentences else -1)
        else:
            class_logits, _ = model.classify(model.encode(question), torch.tensor([question.size(1) - 1]))
            predictions.append(int(class_logits.argmax()))
        labels.append(ex['label'])
    assert len(labels) == len(DIALOGUES)
    assert result['test_acc'] == pytest.approx(np.mean(np.array(predictions) == labels))
    assert result['test_f1'] == pytest.approx(macro_f1(predictions, labels))


def test_no_adaptation_evaluates_the_base(base_path, data_dir, tmp_path):
    result = finetune.main(finetune_args(base_path, data_dir, tmp_path / 'none', '--mode=none'))
    assert result['best_iter'] == 0 and np.isfinite(result['test_ppl']) and result['trainable_params'] == 0
    assert not (tmp_path / 'none' / 'ckpt.pt').exists()


def test_bad_finetune_configs_are_refused(base_path, data_dir, tmp_path):
    with pytest.raises(SystemExit, match='n_prompt > 0'):
        finetune.main(finetune_args(base_path, data_dir, tmp_path, '--mode=ptune'))
    with pytest.raises(SystemExit, match='mode must be one of'):
        finetune.main(finetune_args(base_path, data_dir, tmp_path, '--mode=lora'))
    with pytest.raises(SystemExit, match='--mode=none cannot classify: the class head is new'):
        finetune.main(finetune_args(base_path, data_dir, tmp_path, '--mode=none', '--task=multitask'))
    with pytest.raises(SystemExit, match='--max_new_tokens=95 leaves no room for a source in the 96 tokens'):
        finetune.main(finetune_args(base_path, data_dir, tmp_path, '--generate_examples=1', '--max_new_tokens=95'))


# ----- sample.py -------------------------------------------------------------------------------------


def test_sample_continues_a_prompt(tools, base_path, data_dir):
    tok, _ = tools
    greedy = sample.main([f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=5', '--temperature=0'])
    model, _ = load_model(str(base_path))
    prompt = torch.tensor([tok.encode('孩子发烧')])
    expected = model.eval().generate(prompt, 5, temperature=0, eos_id=[tok.eot_id])[0, prompt.size(1) :].tolist()
    assert greedy == [sample.render(tok, [t for t in expected if t != tok.eot_id])]
    texts = sample.main(
        [f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=5', '--num_samples=2', '--seed=3']
    )
    assert len(texts) == 2 and all(texts)
    again = sample.main(
        [f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=5', '--num_samples=2', '--seed=3']
    )
    assert again == texts  # seeded


def test_samples_generated_in_batches(tools, base_path, data_dir, capsys):
    args = [f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=8']
    greedy = sample.main(args + ['--temperature=0', '--stream=False'])
    # greedy: every row of two batches is the one greedy text, printed with the prompt when its batch ends
    texts = sample.main(args + ['--temperature=0', '--num_samples=4', '--batch_size=2'])
    assert texts == greedy * 4
    assert capsys.readouterr().out.count('孩子发烧' + greedy[0] + '\n' + '-' * 40) == 4
    # sampled: as many texts as asked, seeded whatever the batches
    sampled = sample.main(args + ['--num_samples=5', '--batch_size=2', '--seed=3'])
    assert len(sampled) == 5 and len(set(sampled)) > 1
    assert sample.main(args + ['--num_samples=5', '--batch_size=2', '--seed=3']) == sampled


def test_sample_dialogue_with_a_ptuned_entity_aware_model(base_path, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'pt'
    finetune.main(finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--entity', '--max_iters=1'))
    monkeypatch.setattr('sys.stdin', io.StringIO('两周了，血压正常。\n\n'))
    replies = sample.main(
        [
            f'--out_dir={out}',
            '--dialogue',
            '--interactive',
            '--prompt=最近总是头痛。',
            '--max_new_tokens=4',
            '--temperature=0',
        ]
    )
    assert len(replies) == 2  # the prompt's turn and one from stdin; the blank line is skipped
    assert not any(piece in reply for reply in replies for piece in ('<patient>', '<doctor>', '<eot>'))
    shown = capsys.readouterr().out
    assert '病人：最近总是头痛。' in shown and '病人：两周了，血压正常。' in shown


def test_speaker_pieces_render_as_labelled_lines(tools):
    tok, _ = tools
    ids = tok.encode('<patient>发烧三天<sep>咳嗽<doctor>多喝水')
    assert sample.render(tok, ids) == '\n病人：发烧三天\n咳嗽\n医生：多喝水'


def test_streamed_text_is_the_returned_text(base_path, data_dir, capsys):
    texts = sample.main([f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=12', '--seed=5'])
    assert capsys.readouterr().out.split('\n')[-3] == '孩子发烧' + texts[0]


def test_stream_printer_waits_for_whole_characters(tools, capsys):
    tok, _ = tools
    printer = sample.StreamPrinter(tok, [tok.eot_id])
    pieces = tok.encode('发烧😷了')
    assert len(pieces) == 7  # the emoji is not in the vocabulary: four byte pieces
    shown = []
    for piece in pieces + [tok.eot_id]:
        printer(torch.tensor([[piece]]))
        shown.append(capsys.readouterr().out)
    assert shown == ['发', '烧', '', '', '', '😷', '了', '']


def test_sample_crops_a_long_prompt_with_a_warning(base_path, data_dir, capsys):
    sample.main([f'--checkpoint={base_path}', '--prompt=' + '发烧' * 80, '--max_new_tokens=4'])
    assert 'warning: the prompt has 160 tokens' in capsys.readouterr().err


def test_sample_unknown_device_is_a_clear_error(base_path):
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        sample.main([f'--checkpoint={base_path}', '--device=gpu'])


def test_sample_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='no prompt.pt, best.pt or ckpt.pt'):
        sample.main([f'--out_dir={tmp_path}'])


@pytest.mark.parametrize('decoding', [[], ['--temperature=0.9', '--top_p=0.9', '--repetition_penalty=1.2']])
def test_generated_replies_scored_after_training_match_eval_py_on_the_saved_prompt(
    base_path, data_dir, tmp_path, decoding
):
    import eval as evaluator

    out = tmp_path / 'ptuned'
    result = finetune.main(
        finetune_args(
            base_path,
            data_dir,
            out,
            '--mode=ptune',
            '--n_prompt=3',
            '--lexical=True',
            '--entity=True',
            '--generate_examples=3',
            '--max_new_tokens=5',
            *decoding,
        )
    )
    scored = evaluator.main(
        [
            f'--checkpoint={out}/prompt.pt',
            f'--dataset={data_dir}',
            '--generate',
            '--max_examples=3',
            '--max_new_tokens=5',
            '--batch_size=2',  # sampled replies: the same seed and batches give the same replies
            '--seed=1',
            f'--replies={tmp_path / "replies.jsonl"}',
            *decoding,
        ]
    )
    assert scored['generated'] == result['test_generated'] == 3
    for key in ('bleu1', 'bleu4', 'distinct1', 'distinct2', 'entity_f1'):
        assert result[f'test_{key}'] == pytest.approx(scored[key]), key
    assert result['test_loss'] == pytest.approx(scored['loss'])
    written = [json.loads(line) for line in (out / 'replies.jsonl').read_text(encoding='utf-8').splitlines()]
    assert [sorted(r) for r in written] == [['reference', 'reply', 'source']] * 3
    assert written[0]['source'].startswith('<patient>') and written[0]['reference']
    assert (out / 'replies.jsonl').read_bytes() == (tmp_path / 'replies.jsonl').read_bytes()
    if decoding:  # and the sampling options were used: greedy replies score otherwise (seeded, so always)
        greedy = evaluator.main(
            [
                f'--checkpoint={out}/prompt.pt',
                f'--dataset={data_dir}',
                '--generate',
                '--max_examples=3',
                '--max_new_tokens=5',
            ]
        )
        assert any(greedy[key] != scored[key] for key in ('bleu1', 'distinct1', 'distinct2'))


@pytest.mark.parametrize('extra', [['--task=classify'], ['--entity_splice=True']])
def test_generating_replies_needs_a_dialogue_task(base_path, data_dir, tmp_path, extra):
    with pytest.raises(SystemExit, match='--generate_examples generates doctor replies'):
        finetune.main(finetune_args(base_path, data_dir, tmp_path / 'out', '--generate_examples=2', *extra))
    assert not (tmp_path / 'out').exists()


# ----- out_dir: never the base's folder or another run's ---------------------------------------------


def pretraining_run(base_path, folder):
    """A folder holding a pretraining run, as train.py leaves it: best.pt, ckpt.pt and log.jsonl."""
    folder.mkdir()
    for name in ('best.pt', 'ckpt.pt'):
        shutil.copy(base_path, folder / name)
    (folder / 'log.jsonl').write_text('{"iter": 0, "val_loss": 5.9}\n', encoding='utf-8')
    return {name: (folder / name).read_bytes() for name in ('best.pt', 'ckpt.pt', 'log.jsonl')}


@pytest.mark.parametrize('mode', [['--mode=full'], ['--mode=ptune', '--n_prompt=2']], ids=['full', 'ptune'])
def test_finetuning_into_the_bases_own_folder_is_refused_and_loses_nothing(base_path, data_dir, tmp_path, mode):
    base = tmp_path / 'base'
    before = pretraining_run(base_path, base)
    args = finetune_args(base_path, data_dir, base, *mode)
    args[0] = f'--init_from={base}'
    result = subprocess.run(
        [sys.executable, 'finetune.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    stderr = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(stderr) == 1 and 'Traceback' not in stderr[0], result.stderr
    assert f"--out_dir={base} is the base model's own folder" in stderr[0] and 'another --out_dir' in stderr[0]
    assert {name: (base / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(base)) == ['best.pt', 'ckpt.pt', 'log.jsonl']  # no prompt.pt for sample.py to load


def test_finetuning_into_another_run_or_beside_the_other_modes_result_is_refused(base_path, data_dir, tmp_path):
    other = tmp_path / 'pretrained'
    before = pretraining_run(base_path, other)
    with pytest.raises(SystemExit, match=rf'{other} holds another run \(best.pt, log.jsonl\).*another --out_dir'):
        finetune.main(finetune_args(base_path, data_dir, other))
    assert {name: (other / name).read_bytes() for name in before} == before
    out = tmp_path / 'out'
    finetune.main(finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--max_iters=1'))
    prompt = (out / 'prompt.pt').read_bytes()
    # a full run's ckpt.pt beside prompt.pt: sample.py --out_dir would still load the prompt
    with pytest.raises(SystemExit, match=rf'{out} holds another run \(prompt.pt\)'):
        finetune.main(finetune_args(base_path, data_dir, out, '--max_iters=1'))
    assert (out / 'prompt.pt').read_bytes() == prompt and not (out / 'ckpt.pt').exists()
    finetune.main(
        finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--max_iters=1', '--seed=2')
    )  # the same mode again: its own result is replaced
    assert (out / 'prompt.pt').read_bytes() != prompt
