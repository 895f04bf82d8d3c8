"""convert.py and the BERT vocabulary against the real transformers library (installed, never downloading):
imported GPT-2 computes transformers' logits, exported models load in transformers, the BERT tokenizer gives
BertTokenizer's ids on the shared text, and what must be refused is refused."""

import errno
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ['HF_HUB_OFFLINE'] = '1'  # nothing may download
transformers = pytest.importorskip('transformers')
from safetensors.torch import load_file, save_file  # noqa: E402

import convert  # noqa: E402
from checkpoint import claim_out_dir, load_checkpoint, load_model, save_checkpoint, tokenizer_record  # noqa: E402
from convert import export_hf, import_hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optim import configure_optimizers  # noqa: E402
from prepare.pretrain import default_documents  # noqa: E402
from prepare.sources import Skipped  # noqa: E402
from prepare.text import normalize, reading_for  # noqa: E402
from test_prepare import small_src  # noqa: E402,F401 (a fixture)
from tokenizer import BERT_SPECIALS, Tokenizer, import_bert_vocab, train_char  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('CMED_DATA', ROOT.parent / 'shared' / 'data')).resolve()
VOCAB = DATA / 'gpt2_chinese' / 'vocab.txt'
TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def random_hf_model(seed=0, **config):
    """A tiny GPT2LMHeadModel with every tensor random (biases and LayerNorms too, so none can be ignored)."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            **{**TINY, 'activation_function': 'gelu_new', 'bos_token_id': 0, 'eos_token_id': 1, **config}
        )
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf.eval()


def save_hf(hf, folder, as_pickle):
    """The model as transformers writes it (model.safetensors), or as the released GPT2-Chinese folders hold
    it: pytorch_model.bin with the tied lm_head and the old causal-mask buffers among the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    if as_pickle:
        hf.config.to_json_file(folder / 'config.json')
        state = dict(hf.state_dict())
        n = hf.config.n_positions
        for i in range(hf.config.n_layer):
            state[f'transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(n, n))[None, None]
            state[f'transformer.h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
        torch.save(state, folder / 'pytorch_model.bin')
    else:
        hf.save_pretrained(folder)
    return folder


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


@pytest.mark.parametrize('as_pickle', [True, False], ids=['pytorch_model.bin', 'model.safetensors'])
def test_imported_gpt2_computes_transformers_logits(tmp_path, as_pickle):
    hf = random_hf_model()
    import_hf(str(save_hf(hf, tmp_path / 'hf', as_pickle)), str(tmp_path / 'out'))
    model, checkpoint = load_model(str(tmp_path / 'out'))
    model.eval()
    assert checkpoint['model_args']['activation'] == 'gelu_tanh' and checkpoint['model_args']['block_size'] == 32
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    delta = (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item()
    assert delta < 1e-4, delta
    # one token at a time through the KV cache: each step's logits are transformers' at that position
    cache, steps = model.new_kv_cache(), []
    with torch.no_grad():
        steps.append(model(idx[:, :20], kv_cache=cache, all_logits=True)[0])
        for t in range(20, 32):
            steps.append(model(idx[:, t : t + 1], kv_cache=cache, all_logits=True)[0])
    assert (torch.cat(steps, dim=1) - hf_logits(hf, idx)).abs().max().item() < 1e-4
    # greedy generation, with and without our cache, picks transformers' tokens
    prompt = idx[:, :6]
    expected = hf.generate(
        prompt,
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        attention_mask=torch.ones_like(prompt),
    )
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=use_cache), expected)


def trained_model(tmp_path, steps=5):
    """A model of this project's own kind (no biases, exact GELU) after a few AdamW steps, saved as a run."""
    torch.manual_seed(0)
    args = dict(
        block_size=32,
        vocab_size=97,
        n_layer=2,
        n_head=4,
        n_embd=32,
        dropout=0.0,
        bias=False,
        n_lexical=0,
        n_entity=0,
        attention='manual',
    )
    model = GPT(GPTConfig(**args))
    optimizer = configure_optimizers(model, 'adamw', 0.1, 1e-2, (0.9, 0.95), 'cpu')
    data = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        _, loss = model(data[:, :-1], targets=data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path / 'run'
    run.mkdir()
    save_checkpoint(dict(model=model.state_dict(), model_args=args, config={}), str(run / 'best.pt'))
    return model.eval(), run


def test_model_trained_here_exports_to_transformers_and_back(tmp_path):
    model, run = trained_model(tmp_path)
    export_hf(str(run), str(tmp_path / 'hf'))
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['activation_function'] == 'gelu'  # exact GELU, what this model computes
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() < 1e-4
    # import(export(model)): every tensor comes back bit for bit; the biases it lacked come back as zeros
    import_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'))
    back, _ = load_model(str(tmp_path / 'back'))
    original, returned = model.state_dict(), back.state_dict()
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    added = set(returned) - set(original)
    assert added and all(name.endswith('.bias') and not returned[name].any() for name in added)


def test_import_export_import_is_exact_for_gpt2(tmp_path):
    hf = random_hf_model(seed=4)
    import_hf(str(save_hf(hf, tmp_path / 'hf', as_pickle=False)), str(tmp_path / 'a'))
    export_hf(str(tmp_path / 'a'), str(tmp_path / 'hf2'))
    original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
    exported = load_file(str(tmp_path / 'hf2' / 'model.safetensors'))
    assert set(exported) == set(original) - {'lm_head.weight'}
    assert all(torch.equal(exported[k], original[k]) for k in exported)


# ----------------------------------------------------------------------------- refusals


def test_refuses_configs_gpt2_does_not_compute(tmp_path):
    folder = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=False)
    config = json.loads((folder / 'config.json').read_text())
    for key, value in [
        ('model_type', 'llama'),
        ('n_inner', 100),
        ('activation_function', 'relu'),
        ('scale_attn_by_inverse_layer_idx', True),
        ('reorder_and_upcast_attn', True),
        ('layer_norm_epsilon', 1e-6),
    ]:
        (folder / 'config.json').write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            import_hf(str(folder), str(tmp_path / 'out'))


def test_refuses_shape_mismatch_and_missing_or_unexpected_tensors(tmp_path):
    folder = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=False)
    weights = load_file(str(folder / 'model.safetensors'))
    cases = [
        (
            {**weights, 'transformer.h.1.mlp.c_fc.weight': torch.zeros(32, 100)},
            'transformer.h.1.mlp.c_fc.weight has shape',
        ),
        ({k: v for k, v in weights.items() if k != 'transformer.ln_f.bias'}, 'missing tensor transformer.ln_f.bias'),
        (
            {**weights, 'transformer.h.0.attn.q_norm.weight': torch.ones(8)},
            'unexpected tensor transformer.h.0.attn.q_norm',
        ),
    ]
    for state, message in cases:
        save_file(state, str(folder / 'model.safetensors'))
        with pytest.raises(ValueError, match=message):
            import_hf(str(folder), str(tmp_path / 'out'))


class RunsCode:
    """Unpickling this would call os.system: a pickle that carries code, as a malicious download would."""

    marker = None

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_refuses_a_pickle_with_code_and_never_runs_it(tmp_path):
    folder = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=True)
    RunsCode.marker = tmp_path / 'it-ran'
    state = torch.load(folder / 'pytorch_model.bin', weights_only=True)
    torch.save({**state, 'payload': RunsCode()}, folder / 'pytorch_model.bin')
    result = subprocess.run(
        [sys.executable, 'convert.py', f'--hf_dir={folder}', f'--out_dir={tmp_path / "out"}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and not RunsCode.marker.exists()
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and 'refused' in error[0] and 'pytorch_model.bin' in error[0], result.stderr
    assert not (tmp_path / 'out' / 'best.pt').exists()


def test_export_refuses_tag_tables_unless_dropped(tmp_path):
    model, run = trained_model(tmp_path, steps=1)
    args = dict(torch.load(run / 'best.pt', weights_only=True)['model_args'], n_lexical=4, n_entity=2)
    tagged = GPT(GPTConfig(**args))
    tagged.load_state_dict(model.state_dict(), strict=False)
    save_checkpoint(dict(model=tagged.state_dict(), model_args=args, config={}), str(run / 'best.pt'))
    with pytest.raises(ValueError, match='a lexical table, an entity table'):
        export_hf(str(run), str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()
    export_hf(str(run), str(tmp_path / 'hf'), drop_extras=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() < 1e-4  # tables at zero: same model


# ----------------------------------------------------------------------------- the BERT vocabulary


def shared_lines(n, seed=0):
    """n lines sampled from the shared medical and general text, plus lines made to hit the edge cases."""
    texts = [
        (DATA / name).read_text(encoding=encoding)
        for name, encoding in [
            ('covid_dialog_zh/COVID-Dialogue-Dataset-Chinese.txt', 'utf-8'),
            ('general_zh/CLUECorpusSmall_sampled.txt', 'utf-8'),
            ('medical_book/fever.txt', 'utf-8'),
            ('department_qa/im_sample_gb18030.csv', 'gb18030'),
            ('dxy_dialog/dxy_dialog_data_dialog_v2.txt', 'utf-8'),
        ]
    ]
    imcs = json.loads((DATA / 'imcs21' / 'attr_dev.json').read_text(encoding='utf-8'))
    texts.append('\n'.join(turn['sentence'] for record in imcs.values() for turn in record['dialogue']))
    lines = [line for text in texts for line in text.split('\n') if line.strip()]
    lines = [line[:2000] for line in random.Random(seed).sample(lines, n)]
    return lines + [
        'COVID-19患者，体温38.5℃ Héllo naïve CAFÉ x²  unaffable 😀 ΑΣ 𠀀 ﹏ ¥100',
        'a' * 150 + ' ok',
        'tab\there\x00x\u200bq\ufffdr',
        'İstanbul ǅ ﬁ Ⅻ ①',
        '',
    ]


@pytest.fixture(scope='module')
def bert_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('bert') / 'tokenizer.model'
    import_bert_vocab(str(VOCAB), str(path))
    return path


@pytest.fixture(scope='module')
def bert(bert_file):
    return Tokenizer.load(str(bert_file))


def test_bert_vocab_gives_berttokenizer_ids_on_shared_text(bert):
    reference = transformers.BertTokenizer(str(VOCAB))
    lines = shared_lines(3000)
    for line in lines:
        for text in (line, normalize(line)):  # as the files hold it (as prepare/ reads it for this kind), and NFKC'd
            assert bert.encode(text) == reference.encode(text, add_special_tokens=False), text[:80]
    ids = [i for line in lines for i in bert.encode(line)]
    assert 0 < ids.count(bert.unk_id) < 0.005 * len(ids)  # rare characters do hit [UNK], seldom


def test_bert_vocab_keeps_the_full_width_punctuation_the_model_was_trained_on(bert):
    text = '发烧（38.5℃）三天了，怎么办？多喝水！'
    ids = bert.encode(text)
    assert ids == transformers.BertTokenizer(str(VOCAB)).encode(text, add_special_tokens=False)
    pieces = {bert.pieces[i] for i in ids}
    assert {'（', '）', '，', '？', '！'} <= pieces and not {'(', ')', ',', '?', '!'} & pieces  # (℃ is [UNK])
    assert normalize(text) == '发烧(38.5°C)三天了,怎么办?多喝水!'  # what NFKC (the BPE and char kinds') makes of it
    # on the COVID consultations: every full-width comma and question mark is its own full-width piece
    covid_file = DATA / 'covid_dialog_zh' / 'COVID-Dialogue-Dataset-Chinese.txt'
    if not covid_file.is_file():
        pytest.skip(f'{covid_file} is absent')
    covid = covid_file.read_text(encoding='utf-8')[:200_000]
    ids = bert.encode(covid)
    for mark in '，？':
        assert ids.count(bert.pieces.index(mark)) == covid.count(mark) > 100, mark


def test_a_build_reads_text_as_its_tokenizer_normalises_it(bert_file, tmp_path):
    from prepare.text import line_ends
    from tokenizer import normalization_for

    char_file = tmp_path / 'char.model'
    train_char(['发烧，咳嗽'], str(char_file), vocab_size=300)
    (tmp_path / 'broken.txt').write_bytes(bytes(range(256)))
    assert normalization_for(str(VOCAB)) is line_ends and normalization_for(str(bert_file)) is line_ends
    for spec in ('bpe', 'char', char_file, tmp_path / 'absent.model', tmp_path / 'broken.txt'):
        assert normalization_for(str(spec)) is normalize, spec  # NFKC; a broken or absent file is refused later


def test_bert_vocab_data_set_holds_berttokenizer_ids_of_the_text_as_read(small_src, bert, tmp_path):
    # the pretraining build with the BERT vocabulary reads the shared sources without NFKC: each document in
    # its token files is [CLS], BertTokenizer's ids of a document's text (specials as [unused1-3]), [SEP]
    command = [sys.executable, '-m', 'prepare.pretrain', '--src', str(small_src), '--out', str(tmp_path / 'bert')]
    result = subprocess.run(
        [*command, '--tokenizer', str(VOCAB), '--workers', '1'], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reference = transformers.BertTokenizer(str(VOCAB))

    def reference_ids(text):
        ids = [bert.bos_id]
        for part in re.split('(<patient>|<doctor>|<sep>)', text):
            special = BERT_SPECIALS.get(part)
            ids += [bert.pieces.index(special)] if special else reference.encode(part, add_special_tokens=False)
        return tuple(ids + [bert.eot_id])

    with reading_for(bert.normalize):
        texts = [text for _, text, _, _ in default_documents(str(small_src), Skipped(), [], {})]
    expected = {reference_ids(text) for text in texts}
    meta = json.loads((tmp_path / 'bert' / 'meta.json').read_text(encoding='utf-8'))
    documents = []
    for split in ('train', 'val'):
        ids = np.fromfile(tmp_path / 'bert' / f'{split}.bin', dtype=np.uint16).tolist()
        starts = [i for i, token in enumerate(ids) if token == bert.bos_id] + [len(ids)]
        documents += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
        assert len(starts) - 1 == meta['splits'][split]['records']
    assert set(documents) <= expected and len(documents) > 0.9 * len(texts)
    comma = bert.pieces.index('，')
    assert sum(document.count(comma) for document in documents) > 100  # NFKC would have made them ','


def test_bert_vocab_round_trips_what_it_can_represent(bert):
    checked = 0
    for line in shared_lines(3000, seed=1):
        text, ids, begins = bert.encode_offsets(line)
        assert np.all(np.diff(begins) > 0) and (len(begins) == 0 or begins[-1] < len(text))
        if bert.unk_id in ids:
            continue  # [UNK] stands for text that is gone
        assert bert.encode(bert.decode(ids)) == ids.tolist()  # spaces, case: the ids survive a trip through text
        if text == text.lower() and not any(ch.isspace() for ch in text):
            assert bert.decode(ids) == text
            checked += 1
    assert checked > 1000


def test_bert_vocab_fits_the_tokenizer_interface(bert, bert_file):
    assert bert.kind == 'bert' and json.loads(bert_file.read_text(encoding='utf-8'))['kind'] == 'bert'
    text = '<patient>发烧38.5度<doctor>多喝水<sep>ok<eot>'
    text, ids, begins = bert.encode_offsets(text)
    pieces = [bert.pieces[i] for i in ids]
    assert pieces == [
        '[unused1]',
        '发',
        '烧',
        '38',
        '.',
        '5',
        '度',
        '[unused2]',
        '多',
        '喝',
        '水',
        '[unused3]',
        'ok',
        '[SEP]',
    ]
    assert [text[b] for b in begins] == ['<', '发', '烧', '3', '.', '5', '度', '<', '多', '喝', '水', '<', 'o', '<']
    assert bert.decode(ids) == '<patient>发烧38.5度<doctor>多喝水<sep>ok<eot>'
    counts = bert.char_counts()
    assert counts[ids].sum() == len('发烧38.5度多喝水ok')  # speakers, separators and [SEP] are markup
    assert counts[bert.unk_id] == 1 and counts[bert.bos_id] == 0 and bert.vocab_size == 21128
    assert (bert.bos_id, bert.eot_id, bert.unk_id) == (101, 102, 100)


def test_tagged_documents_start_with_cls_as_uer_trained(bert):
    from tagging import Tagger, lexicon_dir

    ids, lexical, entity = Tagger(lexicon_dir(str(DATA))).encode(bert, '<patient>发烧咳嗽<doctor>多喝水')
    assert ids[0] == bert.bos_id and lexical[0] == 0 and entity[0] == 0
    assert ids[1:].tolist() == bert.encode('<patient>发烧咳嗽<doctor>多喝水') and entity[1:].any()


# ----------------------------------------------------------------------------- nothing lost: import and export


def run_convert(*args):
    """convert.py as a user runs it: (exit code, stderr lines)."""
    result = subprocess.run(
        [sys.executable, 'convert.py', *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stderr.strip().splitlines()


def refused(argv, *words):
    """convert.main refuses argv with one line (a SystemExit) that names each of words."""
    with pytest.raises(SystemExit) as refusal:
        convert.main([str(arg) for arg in argv])
    line = refusal.value.code
    assert isinstance(line, str) and '\n' not in line, line
    for word in words:
        assert word in line, line
    return line


def contents(folder):
    """{name: bytes} of every file in folder (but the lock file a holder writes): compared before and after,
    nothing may change."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != '.lock'}


def bert_vocab(folder, size=97):
    """A vocab.txt of `size` pieces with the specials this project needs (rows for TINY's token table)."""
    pieces = ['[PAD]', '[unused1]', '[unused2]', '[unused3]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    pieces += [chr(0x4E00 + i) for i in range(size - len(pieces))]
    (folder / 'vocab.txt').write_text(''.join(p + '\n' for p in pieces), encoding='utf-8')
    return folder / 'vocab.txt'


def finished_run(tmp_path):
    """A folder holding a training run: best.pt, ckpt.pt and log.jsonl."""
    _, run = trained_model(tmp_path, steps=1)
    (run / 'ckpt.pt').write_bytes((run / 'best.pt').read_bytes())
    (run / 'log.jsonl').write_text('{"iter": 0, "val_loss": 4.5}\n', encoding='utf-8')
    return run


def test_import_into_a_run_is_refused_held_or_not_and_replaces_it_only_with_overwrite(tmp_path):
    hf = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=False)
    run = finished_run(tmp_path)
    before = contents(run)
    code, stderr = run_convert(f'--hf_dir={hf}', f'--out_dir={run}')
    assert code != 0 and len(stderr) == 1 and 'Traceback' not in stderr[0], stderr
    assert f'{run} holds a previous run (ckpt.pt, best.pt, log.jsonl)' in stderr[0] and '--overwrite' in stderr[0]
    assert 'resume' not in stderr[0]  # (train.py's advice: an import has nothing to resume)
    assert contents(run) == before
    with claim_out_dir(str(run)):  # a training run holds out_dir: even --overwrite must wait for it
        refused(
            [f'--hf_dir={hf}', f'--out_dir={run}', '--overwrite'],
            f'{run} is in use by another run',
            f'pid {os.getpid()}',
        )
    assert contents(run) == before
    convert.main([f'--hf_dir={hf}', f'--out_dir={run}', '--overwrite'])
    assert not (run / 'ckpt.pt').exists() and (run / 'log.jsonl').read_bytes() == b''  # the old run is gone whole
    assert load_model(str(run))[1]['config']['converted_by'] == 'convert.py'


def test_nothing_is_written_until_every_file_of_the_import_is_checked(tmp_path):
    hf = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=False)
    config = json.loads((hf / 'config.json').read_text())
    weights = (hf / 'model.safetensors').read_bytes()
    out = tmp_path / 'out'
    cases = [  # (what the folder holds, words the one line must say)
        (dict(config='[1, 2]'), ['config.json holds a JSON list']),
        (dict(config='{"n_embd": 32,'), ['config.json is not valid JSON']),
        (
            dict(config=json.dumps({**config, 'n_positions': 10_000_000})),  # refused from shapes: nothing allocated
            ['transformer.wpe.weight has shape (32, 32)', '(10000000, 32)'],
        ),
        (dict(weights=b''), ['model.safetensors does not read', 'truncated or damaged']),
        (dict(weights=weights[: len(weights) // 2]), ['model.safetensors does not read', 'truncated or damaged']),
        (dict(vocab=lambda: bert_vocab(hf, size=96)), ['vocab.txt has 96 pieces', 'vocab_size', 'is 97']),
        (dict(vocab=lambda: (hf / 'vocab.txt').write_bytes(b'')), ['vocab.txt is not a BERT vocabulary', 'no [UNK]']),
        (
            dict(vocab=lambda: (hf / 'vocab.txt').write_bytes(bytes(range(256)) * 4)),
            ['vocab.txt is not a BERT vocabulary', 'byte 128 is not UTF-8'],
        ),
        (
            dict(vocab=lambda: (hf / 'vocab.txt').write_text('\n'.join(map(str, range(97))) + '\n')),
            ['vocab.txt is not a BERT vocabulary', 'no [UNK], [CLS], [unused1]'],
        ),
    ]
    for case, words in cases:
        (hf / 'config.json').write_text(case.get('config', json.dumps(config)))
        (hf / 'model.safetensors').write_bytes(case.get('weights', weights))
        (hf / 'vocab.txt').unlink(missing_ok=True)
        case.get('vocab', lambda: None)()
        refused([f'--hf_dir={hf}', f'--out_dir={out}'], *words)
        assert not out.exists(), case  # no best.pt before the vocabulary (or anything else) is checked


def test_a_truncated_pytorch_model_bin_is_one_line(tmp_path):
    hf = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=True)
    data = (hf / 'pytorch_model.bin').read_bytes()
    (hf / 'pytorch_model.bin').write_bytes(data[: len(data) // 2])
    refused([f'--hf_dir={hf}', f'--out_dir={tmp_path / "out"}'], 'pytorch_model.bin does not read', 'truncated')
    assert not (tmp_path / 'out').exists()


def test_an_import_carries_its_vocabulary_as_every_checkpoint_carries_its_tokenizer(tmp_path):
    hf = save_hf(random_hf_model(), tmp_path / 'hf', as_pickle=False)
    bert_vocab(hf)
    convert.main([f'--hf_dir={hf}', f'--out_dir={tmp_path / "out"}'])
    saved = load_checkpoint(str(tmp_path / 'out' / 'best.pt'))
    assert saved['tokenizer'] == tokenizer_record(tmp_path / 'out' / 'tokenizer.model')
    assert Tokenizer.from_bytes(saved['tokenizer']['data']).pieces[:8] == [
        '[PAD]',
        '[unused1]',
        '[unused2]',
        '[unused3]',
        '[UNK]',
        '[CLS]',
        '[SEP]',
        '[MASK]',
    ]


def run_with_tokenizer(tmp_path, name, tokenizer_file):
    """A trained run whose checkpoint carries tokenizer_file, as train.py saves it, and names a data folder."""
    (tmp_path / name).mkdir()
    _, run = trained_model(tmp_path / name, steps=1)
    saved = load_checkpoint(str(run / 'best.pt'))
    save_checkpoint(
        dict(saved, tokenizer=tokenizer_record(tokenizer_file), config=dict(dataset=str(tmp_path / 'data'))),
        str(run / 'best.pt'),
    )
    return run


def test_export_ships_the_tokenizer_the_checkpoint_carries_not_the_data_folders(tmp_path):
    (tmp_path / 'data').mkdir()
    train_char(['发烧咳嗽头痛' * 3, 'abcdefghijklmnopqrstuvwxyz'], str(tmp_path / 'carried.model'), 300)
    train_char(['完全不同的字'], str(tmp_path / 'data' / 'tokenizer.model'), 300)  # the folder, rebuilt since
    run = run_with_tokenizer(tmp_path, 'a', tmp_path / 'carried.model')
    convert.main(['--export', f'--out_dir={run}', f'--hf_dir={tmp_path / "hf"}'])
    assert (tmp_path / 'hf' / 'tokenizer.model').read_bytes() == (tmp_path / 'carried.model').read_bytes()
    refused(
        [
            '--export',
            f'--out_dir={run}',
            f'--hf_dir={tmp_path / "hf2"}',
            f'--tokenizer={tmp_path / "data" / "tokenizer.model"}',
        ],
        'carries the tokenizer it was trained with',
        'leave --tokenizer out',
    )
    assert not (tmp_path / 'hf2').exists()


def test_export_of_a_checkpoint_without_a_tokenizer_refuses_one_of_another_size(tmp_path):
    _, run = trained_model(tmp_path, steps=1)  # carries no tokenizer record
    big = train_char(
        ['发烧咳嗽头痛' * 50 + ''.join(chr(0x4E00 + i) for i in range(400))], str(tmp_path / 'big.model'), 600
    )
    refused(
        ['--export', f'--out_dir={run}', f'--hf_dir={tmp_path / "hf"}', f'--tokenizer={tmp_path / "big.model"}'],
        f'big.model has {big.vocab_size} pieces',
        'the model 97 rows',
    )
    assert not (tmp_path / 'hf').exists()


def test_export_never_replaces_another_model_unasked_and_replaces_it_whole(tmp_path):
    hf = tmp_path / 'hf'
    imported = save_hf(random_hf_model(), tmp_path / 'gpt2', as_pickle=False)
    bert_vocab(imported)
    convert.main([f'--hf_dir={imported}', f'--out_dir={tmp_path / "bert_run"}'])
    convert.main(['--export', f'--out_dir={tmp_path / "bert_run"}', f'--hf_dir={hf}'])  # ships vocab.txt
    before = contents(hf)
    assert 'vocab.txt' in before
    (tmp_path / 'data').mkdir()
    train_char(['发烧咳嗽头痛'], str(tmp_path / 'char.model'), 300)
    other = run_with_tokenizer(tmp_path, 'other', tmp_path / 'char.model')
    code, stderr = run_convert('--export', f'--out_dir={other}', f'--hf_dir={hf}')
    assert code != 0 and len(stderr) == 1 and f'{hf} is not empty' in stderr[0] and '--overwrite' in stderr[0]
    assert contents(hf) == before
    convert.main(['--export', f'--out_dir={other}', f'--hf_dir={hf}', '--overwrite'])
    after = contents(hf)
    assert 'vocab.txt' not in after and after['tokenizer.model'] == (tmp_path / 'char.model').read_bytes()
    assert not (tmp_path / 'hf.tmp').exists() and not (tmp_path / 'hf.old').exists()
    # --overwrite replaces a model folder, never a folder of anything else
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'todo.txt').write_text('mine')
    refused(
        ['--export', f'--out_dir={other}', f'--hf_dir={tmp_path / "notes"}', '--overwrite'],
        f'{tmp_path / "notes"} is not a folder this command built (no config.json in it)',
    )
    assert contents(tmp_path / 'notes') == {'todo.txt': b'mine'}


def test_an_export_cut_short_by_a_full_disk_leaves_the_previous_folder(tmp_path, monkeypatch):
    _, run = trained_model(tmp_path, steps=1)
    convert.main(['--export', f'--out_dir={run}', f'--hf_dir={tmp_path / "hf"}'])
    before = contents(tmp_path / 'hf')
    import safetensors.torch

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b'half a file')
        raise OSError(errno.ENOSPC, 'No space left on device', path)

    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    refused(['--export', f'--out_dir={run}', f'--hf_dir={tmp_path / "hf"}', '--overwrite'], 'No space left on device')
    assert contents(tmp_path / 'hf') == before and not (tmp_path / 'hf.tmp').exists()
