"""Bad input to sample.py and finetune.py: each case is refused with one clear line, or works correctly.

Every refusal is a SystemExit with one line (what is wrong, where, what to do) raised before anything is
loaded or written. The cases a user meets at the command line run as one small process each and check
what the user sees: a non-zero exit code and exactly one line on stderr, no traceback. The other cases
call main() and check the same message in-process (starting Python with torch costs seconds on a busy
machine). The fixtures are test_finetune.py's: a char tokenizer, hand-made dialogues, a 1-layer base.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import finetune
import sample
from checkpoint import claim_out_dir, fingerprint, load_checkpoint, load_model, save_checkpoint, tokenizer_record
from test_finetune import DIALOGUES, LABELS, base_path, data_dir, finetune_args, tools  # noqa: F401 (fixtures)
from tokenizer import Tokenizer, train_char

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(script, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_refusal(result, *words):
    """The one line a refused command printed; it must name each of words."""
    assert result.returncode != 0, result.stdout
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    for word in words:
        assert word in line, line
    return line


def refusal(main, argv, *words):
    """The same check, in-process: main refuses argv with a one-line SystemExit naming each of words."""
    with pytest.raises(SystemExit) as refused:
        main([str(arg) for arg in argv])
    line = refused.value.code
    assert isinstance(line, str) and '\n' not in line, line
    for word in words:
        assert word in line, line
    return line


def other_tokenizer(tmp_path, tools, extra=''):
    """A tokenizer the data could have been rebuilt with: the same characters in another order (the same
    vocabulary size, other ids), plus any extra characters."""
    texts = [text for turns, _ in DIALOGUES for _, text in turns] + [f'这属于{n}。' for n in LABELS]
    path = tmp_path / 'other-tokenizer.model'
    tok = train_char(texts + ['体温' * 50, extra], str(path), vocab_size=400)
    assert tok.vocab_size == tools[0].vocab_size + len(extra) and tok.pieces != tools[0].pieces
    return path


def rebuilt_data_dir(data_dir, tokenizer_path, tmp_path):
    """A copy of the data folder whose tokenizer.model (and meta's vocab_size) is another one."""
    folder = tmp_path / 'rebuilt'
    shutil.copytree(data_dir, folder)
    shutil.copy(tokenizer_path, folder / 'tokenizer.model')
    meta = json.loads((folder / 'meta.json').read_text(encoding='utf-8'))
    meta['vocab_size'] = Tokenizer.load(str(tokenizer_path)).vocab_size
    (folder / 'meta.json').write_text(json.dumps(meta, ensure_ascii=False), encoding='utf-8')
    return folder


def without_tokenizer(path, tmp_path):
    """The checkpoint without its tokenizer record: sample.py and finetune.py then read a data folder's."""
    old = load_checkpoint(str(path))
    del old['tokenizer']
    old_path = tmp_path / 'old' / 'best.pt'
    old_path.parent.mkdir()
    save_checkpoint(old, str(old_path))
    return old_path


# ----- sample.py: options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'option, message',
    [
        ('--temperature=-1', '--temperature must be a number >= 0 (0 = greedy), not -1.0'),  # sampled the least likely
        ('--temperature=nan', '--temperature must be a number >= 0 (0 = greedy), not nan'),
        ('--top_k=-1', '--top_k must be >= 0 (0 = off), not -1'),
        ('--top_p=1.5', '--top_p must be in (0, 1] (1 = off), not 1.5'),
        ('--num_samples=0', '--num_samples must be >= 1, not 0'),
        ('--batch_size=0', '--batch_size must be >= 1, not 0'),
        ('--max_new_tokens=-1', '--max_new_tokens must be >= 0, not -1'),
    ],
)
def test_sample_option_out_of_range_is_refused_before_loading(option, message, tmp_path):
    # the checkpoint does not exist: the option is refused before anything loads
    assert refusal(sample.main, [f'--checkpoint={tmp_path}/none.pt', option]) == message


def test_sample_top_p_zero_at_the_command_line(tmp_path):  # torch.multinomial would fail with a traceback
    line = cli_refusal(run_cli('sample.py', f'--checkpoint={tmp_path}/none.pt', '--top_p=0'))
    assert line == '--top_p must be in (0, 1] (1 = off), not 0.0'


def test_empty_prompt_generates_from_the_start_of_a_text(tools, base_path):
    tok, _ = tools
    texts = sample.main([f'--checkpoint={base_path}', '--prompt=', '--max_new_tokens=6', '--temperature=0'])
    model, _ = load_model(str(base_path))
    start = torch.tensor([[tok.eot_id]])  # every pretraining document follows an <eot>
    expected = model.eval().generate(start, 6, temperature=0, eos_id=[tok.eot_id])[0, 1:].tolist()
    assert texts == [sample.render(tok, [t for t in expected if t != tok.eot_id])]


def test_empty_dialogue_turn_is_refused_unless_turns_come_from_stdin(base_path, monkeypatch):
    refusal(sample.main, [f'--checkpoint={base_path}', '--dialogue', '--prompt='], '--prompt', '--interactive')
    monkeypatch.setattr('sys.stdin', io.StringIO('两周了，血压正常。\n'))
    replies = sample.main(
        [
            f'--checkpoint={base_path}',
            '--dialogue',
            '--interactive',
            '--prompt=',
            '--max_new_tokens=3',
            '--temperature=0',
        ]
    )
    assert len(replies) == 1  # the stdin turn alone


# ----- sample.py: the tokenizer and the base travel with the checkpoint --------------------------------


def test_sample_reads_the_checkpoint_tokenizer_not_a_rebuilt_data_folder(tools, base_path, data_dir, tmp_path):
    rebuilt = rebuilt_data_dir(data_dir, other_tokenizer(tmp_path, tools), tmp_path)
    args = [f'--checkpoint={base_path}', '--prompt=孩子发烧', '--max_new_tokens=6', '--temperature=0']
    assert sample.main(args + [f'--data_dir={rebuilt}']) == sample.main(args + [f'--data_dir={data_dir}'])


def test_checkpoint_without_tokenizer_reads_data_dir_and_refuses_another_vocabulary(
    tools, base_path, data_dir, tmp_path
):
    old_path = without_tokenizer(base_path, tmp_path)
    args = [f'--checkpoint={old_path}', '--prompt=孩子发烧', '--max_new_tokens=6', '--temperature=0']
    assert sample.main(args + [f'--data_dir={data_dir}']) == sample.main([f'--checkpoint={base_path}'] + args[1:])
    rebuilt = rebuilt_data_dir(data_dir, other_tokenizer(tmp_path, tools, extra='甲乙丙丁戊己庚辛'), tmp_path)
    line = refusal(sample.main, args + [f'--data_dir={rebuilt}'], f'{rebuilt}/tokenizer.model', '--data_dir')
    assert f'has {tools[0].vocab_size + 8} tokens but the model has {tools[0].vocab_size}' in line


def test_ptuned_run_samples_from_another_folder_and_names_a_missing_base(base_path, data_dir, tmp_path, monkeypatch):
    out = tmp_path / 'pt'
    finetune.main(finetune_args(base_path, data_dir, out, '--mode=ptune', '--n_prompt=2', '--max_iters=1'))
    saved = load_checkpoint(str(out / 'prompt.pt'), required_keys=())
    assert saved['base_checkpoint'] == str(base_path) and os.path.isabs(saved['base_checkpoint'])
    assert saved['tokenizer'] == tokenizer_record(data_dir / 'tokenizer.model')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = [f'--out_dir={out}', '--prompt=孩子发烧', '--max_new_tokens=3', '--temperature=0']
    texts = sample.main(args)
    expected = fingerprint(load_checkpoint(str(base_path))['model'])
    moved = tmp_path / 'moved.pt'  # the base moves: the file's recorded path is gone
    shutil.move(base_path, moved)
    try:
        line = cli_refusal(run_cli('sample.py', *args, cwd=elsewhere), str(base_path), '--base=', expected)
        assert sample.main(args + [f'--base={moved}']) == texts
    finally:
        shutil.move(moved, base_path)
    assert 'which is not there' in line


# bytes that are no checkpoint: seeded noise, and noise behind a pickle header of an unknown protocol
# (torch warns about such a header before it refuses the file; the user still sees one line)
NOT_CHECKPOINTS = [
    bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).tolist())
    for seed in range(3)
] + [b'\x80\x8a' + bytes(range(256)) * 16]


@pytest.mark.parametrize('junk', NOT_CHECKPOINTS)
def test_sample_unloadable_checkpoint_is_one_line(tmp_path, junk):
    bad = tmp_path / 'best.pt'
    bad.write_bytes(junk)
    refusal(sample.main, [f'--checkpoint={bad}'], str(bad))


# ----- finetune.py: options, inputs and out_dir checked before anything is written ----------------------


@pytest.mark.parametrize(
    'option',
    [
        '--batch_size=0',
        '--eval_interval=0',
        '--epochs=0',
        '--max_iters=-1',
        '--learning_rate=nan',
        '--n_prompt=-1',
        '--dropout=1.0',
        '--log_interval=0',
        '--temperature=-1',
        '--top_p=0',
        '--top_k=-1',
        '--repetition_penalty=0',
        '--no_repeat_ngram_size=-1',
    ],
)
def test_finetune_option_out_of_range_is_refused(option, base_path, data_dir, tmp_path):
    key = option[2 : option.index('=')]
    refusal(finetune.main, finetune_args(base_path, data_dir, tmp_path / 'out', option), f'--{key} must be')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('n_prompt', [200, 96])  # the base's block_size is 96
def test_prompt_that_leaves_no_room_is_refused(n_prompt, base_path, data_dir, tmp_path):
    args = finetune_args(base_path, data_dir, tmp_path / 'out', '--mode=ptune', f'--n_prompt={n_prompt}')
    refusal(finetune.main, args, f'--n_prompt={n_prompt}', 'block_size=96')
    assert not (tmp_path / 'out').exists()


def test_prompt_that_fills_the_context_at_the_command_line(base_path, data_dir, tmp_path):
    result = run_cli(
        'finetune.py', *finetune_args(base_path, data_dir, tmp_path / 'out', '--mode=ptune', '--n_prompt=96')
    )
    cli_refusal(result, '--n_prompt=96', 'leaves no room', 'block_size=96')
    assert not (tmp_path / 'out').exists()


def test_batch_larger_than_the_training_set_is_refused(base_path, data_dir, tmp_path):
    refusal(
        finetune.main,
        finetune_args(base_path, data_dir, tmp_path / 'out', '--batch_size=1000'),
        '--batch_size=1000',
        'training examples',
        str(data_dir),
    )


def test_missing_data_set_names_its_prepare_command(base_path, tmp_path):
    result = run_cli(
        'finetune.py', f'--init_from={base_path.parent}', '--dataset=covid', f'--out_dir={tmp_path}/out', cwd=tmp_path
    )  # no data/covid here
    line = cli_refusal(result, 'data/covid', 'python -m prepare.covid')
    assert not (tmp_path / 'out').exists(), line


def test_missing_base_names_the_file_and_init_from(data_dir, tmp_path):
    refusal(
        finetune.main,
        [f'--init_from={tmp_path}', f'--dataset={data_dir}', f'--out_dir={tmp_path}/out'],
        f'{tmp_path}/best.pt',
        '--init_from',
    )


@pytest.mark.parametrize('junk', NOT_CHECKPOINTS[-2:])
def test_unloadable_base_at_the_command_line(data_dir, tmp_path, junk):
    (tmp_path / 'best.pt').write_bytes(junk)
    result = run_cli('finetune.py', f'--init_from={tmp_path}', f'--dataset={data_dir}', f'--out_dir={tmp_path}/out')
    cli_refusal(result, f'{tmp_path}/best.pt', '--init_from')
    assert not (tmp_path / 'out').exists()


def test_base_and_rebuilt_data_folder_with_another_tokenizer_are_refused(tools, base_path, data_dir, tmp_path):
    rebuilt = rebuilt_data_dir(data_dir, other_tokenizer(tmp_path, tools), tmp_path)
    result = run_cli('finetune.py', *finetune_args(base_path, rebuilt, tmp_path / 'out'))
    cli_refusal(result, str(base_path), f'{rebuilt}/tokenizer.model')
    assert not (tmp_path / 'out').exists()


def test_base_without_tokenizer_and_with_another_vocabulary_size_is_refused(tools, base_path, data_dir, tmp_path):
    old_path = without_tokenizer(base_path, tmp_path)
    rebuilt = rebuilt_data_dir(data_dir, other_tokenizer(tmp_path, tools, extra='甲乙丙丁戊己庚辛'), tmp_path)
    line = refusal(finetune.main, finetune_args(old_path, rebuilt, tmp_path / 'out'), str(old_path), str(rebuilt))
    assert f'{tools[0].vocab_size} tokens' in line and f'{tools[0].vocab_size + 8}' in line


def test_second_run_in_an_out_dir_is_refused_naming_the_holder(base_path, data_dir, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'results.jsonl').write_text('{"a previous": "run"}\n', encoding='utf-8')
    with claim_out_dir(str(out)):  # a first run holds out_dir
        result = run_cli('finetune.py', *finetune_args(base_path, data_dir, out))
    cli_refusal(result, str(out), str(os.getpid()))
    assert (out / 'results.jsonl').read_text(encoding='utf-8') == '{"a previous": "run"}\n'
    assert not (out / 'ckpt.pt').exists()


def test_full_finetune_saves_its_tokenizer_and_the_absolute_base(base_path, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_dir = os.path.relpath(base_path.parent, tmp_path)
    args = [f'--init_from={base_dir}', f'--dataset={data_dir}', '--out_dir=full', '--max_iters=1', '--batch_size=2']
    finetune.main(args)
    saved = load_checkpoint('full/ckpt.pt')
    assert saved['base'] == str(base_path)
    assert saved['tokenizer'] == tokenizer_record(data_dir / 'tokenizer.model')
    finetune.main(args)  # the first run released out_dir
    assert len((tmp_path / 'full' / 'results.jsonl').read_text(encoding='utf-8').splitlines()) == 2


def test_label_sentences_that_do_not_fit_beside_the_prompt_are_refused(base_path, data_dir, tmp_path):
    # 90 of the 96 positions for the prompt leave 6, fewer than '这属于神经科。<eot>' (8): unchecked, scoring
    # the test split after training would fail with an IndexError
    args = finetune_args(base_path, data_dir, tmp_path / 'out', '--task=label_text', '--mode=ptune', '--n_prompt=90')
    refusal(finetune.main, args, '--n_prompt=90', 'leaves 6 tokens', 'label sentence (8 tokens)')
    assert not (tmp_path / 'out').exists()


def test_labelled_task_on_a_data_set_without_labels_is_refused(base_path, data_dir, tmp_path):
    unlabelled = tmp_path / 'unlabelled'
    shutil.copytree(data_dir, unlabelled)
    meta = json.loads((unlabelled / 'meta.json').read_text(encoding='utf-8'))
    (unlabelled / 'meta.json').write_text(json.dumps(dict(meta, label_names=[])), encoding='utf-8')
    refusal(
        finetune.main,
        finetune_args(base_path, unlabelled, tmp_path / 'out', '--task=classify'),
        '--task=classify',
        'no labels',
        str(unlabelled),
    )
