"""
Fine-tuning example sets as model inputs, and how they are scored: shared by finetune.py (training),
eval.py and reproduce.py.

An example set (prepare/: covid, dxy, department) stores, per split, the tokens of every example with
its lexical and entity ids, a loss mask that is 1 on the target (the doctor's reply + <eot>) and an
optional label. Here an example becomes a model input: cropped to the context, the target scored and
nothing else, the soft prompt's position and the token the class head reads.
"""
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from common import autocast_context, load_char_counts


# ----------------------------------------------------------------------------- examples

def load_split(data_dir, split):
    """One split of an example set as a list of dicts of numpy arrays (source + target + eot)."""
    def read(suffix, dtype):
        return np.fromfile(os.path.join(data_dir, f"{split}.{suffix}"), dtype=dtype)
    tokens, lexical, entity, mask = read('bin', np.uint16), read('lex.bin', np.uint8), \
        read('ent.bin', np.uint8), read('mask.bin', np.uint8)
    offsets = np.load(os.path.join(data_dir, f"{split}.offsets.npy"))
    labels = np.load(os.path.join(data_dir, f"{split}.labels.npy"))
    examples = []
    for i, label in enumerate(labels):
        part = slice(offsets[i], offsets[i + 1])
        examples.append(dict(tokens=tokens[part].astype(np.int64), lexical=lexical[part].astype(np.int64),
                             entity=entity[part].astype(np.int64), mask=mask[part], label=int(label)))
    return examples


def entity_runs(tokens, entity):
    """The distinct runs of consecutive entity-tagged tokens, in order of appearance."""
    runs, current = [], []
    for token, tag in zip(tokens.tolist(), entity.tolist()):
        if tag:
            current.append(token)
        elif current:
            runs.append(tuple(current))
            current = []
    if current:
        runs.append(tuple(current))
    return list(dict.fromkeys(runs))


def splice_entities(ex, target_start, sep_id):
    """Entity splicing (the paper's baseline): the source's entity words, each after a separator,
    go in as plain text just before the source's last token (the doctor's speaker piece)."""
    runs = entity_runs(ex['tokens'][:target_start], ex['entity'][:target_start])
    if not runs:
        return ex
    extra = np.array([t for run in runs for t in (sep_id,) + run], dtype=np.int64)
    extra_entity = np.array([t for run in runs for t in (0,) + (1,) * len(run)], dtype=np.int64)
    cut = target_start - 1
    def insert(array, values):
        return np.concatenate([array[:cut], values.astype(array.dtype), array[cut:]])
    return dict(ex, tokens=insert(ex['tokens'], extra), lexical=insert(ex['lexical'], np.zeros_like(extra)),
                entity=insert(ex['entity'], extra_entity), mask=insert(ex['mask'], np.zeros_like(extra)))


def with_label_target(ex, target_start, label_ids, eot_id):
    """BioGPT's text-as-label: the target becomes the label's sentence."""
    target = np.array(label_ids + [eot_id], dtype=np.int64)
    keep = slice(0, target_start)
    return dict(ex, tokens=np.concatenate([ex['tokens'][keep], target]),
                lexical=np.concatenate([ex['lexical'][keep], np.zeros_like(target)]),
                entity=np.concatenate([ex['entity'][keep], np.zeros_like(target)]),
                mask=np.concatenate([ex['mask'][keep], np.ones(len(target), dtype=np.uint8)]))


def crop_window(length, target_start, room):
    """[start, end) of at most room tokens, cropping the source from the left; if the target alone
    does not fit, the source keeps half the window and the target is cut at the end."""
    if length <= room:
        return 0, length
    source_keep = min(target_start, max(room - (length - target_start), room // 2))
    start = target_start - source_keep
    return start, start + room


def build_input(ex, cfg, room, special, label_ids=None):
    """One model input from an example: idx, targets (-1 where not scored), tags, prompt and class positions."""
    target_start = int(np.argmax(ex['mask']))
    if cfg.task == 'label_text':
        ex = with_label_target(ex, target_start, label_ids, special['eot'])
    if cfg.entity_splice:
        ex = splice_entities(ex, target_start, special['sep'])
        target_start = int(np.argmax(ex['mask']))
    if cfg.task == 'classify':  # the question alone: everything before the answer
        start, _ = crop_window(target_start, target_start, room)
        seq = {k: ex[k][start:target_start] for k in ('tokens', 'lexical', 'entity')}
        return dict(idx=seq['tokens'], targets=None, lexical=seq['lexical'], entity=seq['entity'],
                    prompt_pos=len(seq['tokens']), class_pos=len(seq['tokens']) - 1, label=ex['label'])
    start, end = crop_window(len(ex['tokens']), target_start, room + 1)  # +1: inputs and targets shift by one
    seq = {k: ex[k][start:end] for k in ('tokens', 'lexical', 'entity', 'mask')}
    targets = np.where(seq['mask'][1:] == 1, seq['tokens'][1:], -1)  # score only the answer's tokens
    source_len = target_start - start
    return dict(idx=seq['tokens'][:-1], targets=targets, lexical=seq['lexical'][:-1], entity=seq['entity'][:-1],
                prompt_pos=source_len, class_pos=source_len - 1, label=ex['label'])


def collate(inputs, cfg, pad_id, device):
    """Right-pad a list of inputs into batch tensors; padding is never scored."""
    T = max(len(x['idx']) for x in inputs)
    def pad(key, value):
        rows = [np.pad(x[key], (0, T - len(x[key])), constant_values=value) for x in inputs]
        return torch.from_numpy(np.stack(rows)).to(device)
    batch = dict(idx=pad('idx', pad_id),
                 class_pos=torch.tensor([x['class_pos'] for x in inputs], device=device),
                 labels=torch.tensor([x['label'] for x in inputs], device=device))
    if inputs[0]['targets'] is not None:
        batch['targets'] = pad('targets', -1)
    if cfg.lexical:
        batch['lexical'] = pad('lexical', 0)
    if cfg.entity:
        batch['entity'] = pad('entity', 0)
    if cfg.n_prompt and cfg.prompt_position == 'infix':
        batch['prompt_pos'] = torch.tensor([x['prompt_pos'] for x in inputs], device=device)
    return batch


def task_loss(model, batch, cfg):
    """The training loss of the task; returns (loss, lm_loss, class_loss) with None for parts not used."""
    h = model.encode(batch['idx'], batch.get('lexical'), batch.get('entity'), batch.get('prompt_pos'))
    lm_loss = class_loss = None
    if cfg.task != 'classify':
        _, lm_loss = model.lm_head_loss(h, batch['targets'])
    if cfg.task in ('classify', 'multitask'):
        _, class_loss = model.classify(h, batch['class_pos'], batch['labels'])
    if cfg.task == 'classify':
        return class_loss, lm_loss, class_loss
    if cfg.task == 'multitask':
        return class_loss + cfg.lambda_lm * lm_loss, lm_loss, class_loss
    return lm_loss, lm_loss, class_loss


# ----------------------------------------------------------------------------- scoring

def macro_f1(predictions, labels):
    """F1 averaged over the classes present in labels (a prediction of no class counts as wrong)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = []
    for c in np.unique(labels):
        true_pos = np.sum((predictions == c) & (labels == c))
        precision = true_pos / max(np.sum(predictions == c), 1)
        recall = true_pos / np.sum(labels == c)
        scores.append(0.0 if true_pos == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def in_batches(inputs, batch_size):
    """Evaluation batches of similar lengths (little padding), in a fixed order."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]['idx']))
    for i in range(0, len(order), batch_size):
        yield [inputs[j] for j in order[i:i + batch_size]]


@torch.no_grad()
def evaluate(model, inputs, cfg, task_data):
    """Loss, perplexity and bits per character on target tokens; class loss, accuracy and macro-F1."""
    model.eval()
    nats = class_nats = 0.0
    n_tokens = n_chars = 0
    predictions, labels = [], []
    for chunk in in_batches(inputs, cfg.batch_size):
        batch = collate(chunk, cfg, task_data.pad_id, task_data.device)
        with task_data.autocast:
            h = model.encode(batch['idx'], batch.get('lexical'), batch.get('entity'), batch.get('prompt_pos'))
            if cfg.task != 'classify':
                scored = batch['targets'] != -1
                # the LM head on the scored positions only, as one row: (1, N, C) -> (1, N, V)
                _, nats_sum = model.lm_head_loss(h[scored][None], batch['targets'][scored][None], reduction='sum')
                nats += nats_sum.item()
                n_tokens += int(scored.sum())
                n_chars += int(task_data.char_counts[batch['targets'][scored].cpu().numpy()].sum())
            if cfg.task in ('classify', 'multitask'):
                class_logits, _ = model.classify(h, batch['class_pos'])
                class_nats += F.cross_entropy(class_logits.float(), batch['labels'], reduction='sum').item()
                predictions += class_logits.argmax(-1).tolist()
                labels += batch['labels'].tolist()
    model.train()
    metrics = {}
    if n_tokens:
        metrics.update(loss=nats / n_tokens, ppl=math.exp(nats / n_tokens), bpc=nats / math.log(2) / max(n_chars, 1))
    if labels:
        metrics.update(class_loss=class_nats / len(labels), acc=float(np.mean(np.array(predictions) == labels)),
                       f1=macro_f1(predictions, labels))
    return metrics


def selection_loss(metrics, cfg):
    """The validation number that picks the best model: the training objective's."""
    if cfg.task == 'classify':
        return metrics['class_loss']
    if cfg.task == 'multitask':
        return metrics['class_loss'] + cfg.lambda_lm * metrics['loss']
    return metrics['loss']


@torch.no_grad()
def label_text_accuracy(model, examples, cfg, task_data):
    """BioGPT's text-as-label: generate greedily after the question; correct when the generated
    sentence is exactly the label's sentence."""
    model.eval()
    sentences = [cfg.label_template.format(name) for name in task_data.label_names]
    longest = max(len(ids) for ids in task_data.label_ids) + 1
    question_cfg = SimpleNamespace(**dict(vars(cfg), task='classify'))
    predictions, labels = [], []
    for ex in examples:
        x = build_input(ex, question_cfg, task_data.room - longest, task_data.special)
        batch = collate([x], question_cfg, task_data.pad_id, task_data.device)
        with task_data.autocast:
            out = model.generate(batch['idx'], longest, temperature=0, lexical=batch.get('lexical'),
                                 entity=batch.get('entity'), prompt_pos=batch.get('prompt_pos'),
                                 eos_id=task_data.special['eot'])
        generated = out[0, batch['idx'].size(1):].tolist()
        text = task_data.tokenizer.decode([t for t in generated if t != task_data.special['eot']])
        predictions.append(sentences.index(text) if text in sentences else -1)
        labels.append(ex['label'])
    model.train()
    return dict(acc=float(np.mean(np.array(predictions) == labels)), f1=macro_f1(predictions, labels))


def generation_scores(model, task_data, task_cfg, examples, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
                      seed=1337):
    """Generate a reply for each example's source (greedy at temperature 0, else sampled with a seeded
    generator) and score the replies against the references (metrics.py)."""
    from metrics import bleu, distinct, entities_in, entity_scores, terms_in
    from tagging import Tagger
    tok = task_data.tokenizer
    stops = [tok.eot_id, tok.patient_id, tok.doctor_id]  # a reply ends where the next turn would begin
    source_cfg = SimpleNamespace(**dict(vars(task_cfg), task='classify'))  # the source alone, up to <doctor>
    generator = torch.Generator(device=task_data.device).manual_seed(seed)
    generated, references, marked = [], [], []  # marked: the entity spans of each reference
    model.eval()
    for ex in tqdm(examples, desc='generate', unit='reply', mininterval=2):
        x = build_input(ex, source_cfg, task_data.room - max_new_tokens, task_data.special)
        batch = collate([x], source_cfg, task_data.pad_id, task_data.device)
        with task_data.autocast:
            out = model.generate(batch['idx'], max_new_tokens, temperature=temperature, top_k=top_k or None,
                                 top_p=top_p if top_p < 1.0 else None, lexical=batch.get('lexical'),
                                 entity=batch.get('entity'), prompt_pos=batch.get('prompt_pos'), eos_id=stops,
                                 generator=generator)
        generated.append(tok.decode([t for t in out[0, batch['idx'].size(1):].tolist() if t not in stops]))
        target = ex['tokens'][int(np.argmax(ex['mask'])):].tolist()
        references.append(tok.decode([t for t in target if t not in stops]))
        marked.append(reply_spans(tok, ex))
    model.train()
    tagger = Tagger(tagging_lexicon(task_data.meta))
    precision, recall, f1 = entity_scores([entities_in(t, tagger) for t in generated],
                                          [entities_in(t, tagger) for t in references])
    scores = dict(generated=len(generated), bleu1=bleu(generated, references, 1), bleu2=bleu(generated, references, 2),
                  bleu4=bleu(generated, references, 4), distinct1=distinct(generated, 1),
                  distinct2=distinct(generated, 2), entity_precision=precision, entity_recall=recall, entity_f1=f1)
    if task_data.meta.get('entity_source') == 'gold':  # the set's own labels: see metrics.py
        # the vocabulary: what annotators marked in the training replies of the labelled dialogues (the
        # unlabelled ones carry lexicon tags)
        terms = set().union(*(reply_spans(tok, ex) for ex in labelled_dialogue_examples(task_data.examples['train'])))
        longest = max(map(len, terms), default=1)
        precision, recall, f1 = entity_scores([terms_in(t, terms, longest) for t in generated], marked)
        scores.update(gold_entity_precision=precision, gold_entity_recall=recall, gold_entity_f1=f1)
    return scores


def labelled_dialogue_examples(examples):
    """The examples of labelled dialogues. Only a dialogue's first example carries its label (prepare/dataset.py:
    one classification example per dialogue); its other examples follow it, each extending the one before."""
    kept, inside, previous = [], False, np.zeros(0, dtype=np.int64)
    for ex in examples:
        body = previous[:-1]  # the previous example without its closing <eot>
        extends = len(ex['tokens']) > len(previous) > 0 and np.array_equal(ex['tokens'][:len(body)], body)
        inside = ex['label'] >= 0 or (inside and extends)
        if inside:
            kept.append(ex)
        previous = ex['tokens']
    return kept


def reply_spans(tok, ex):
    """The entity spans of an example's reply (its target)."""
    start = int(np.argmax(ex['mask']))
    return span_texts(tok, ex['tokens'][start:], ex['entity'][start:])


def span_texts(tok, tokens, entity):
    """The text of each run of entity-tagged tokens."""
    texts = (tok.decode(list(run)).strip() for run in entity_runs(tokens, entity))
    return {text for text in texts if text and '\ufffd' not in text}  # (not a run that cuts a character)


def tagging_lexicon(meta):
    """The lexicon folder the example set was tagged with (meta.json lists its files), so that entity F1 counts
    the terms the entity ids mark; prepare/'s default folder if that one has gone."""
    from tagging import lexicon_dir
    files = [path for path in meta.get('sources', {}) if os.path.basename(os.path.dirname(path)) == 'medical_lexicon']
    folders = {os.path.dirname(path) for path in files}
    if len(folders) == 1 and all(os.path.isfile(path) for path in files):
        return folders.pop()
    return lexicon_dir()


# ----------------------------------------------------------------------------- a task's data

def load_task(cfg, model_args, meta, data_dir, device, dtype):
    """What a fine-tuning run reads besides the model: tokenizer facts, precision, and the model
    inputs (and raw examples) of each split."""
    from tokenizer import Tokenizer  # here: only runs that fine-tune need the tokenizer
    tokenizer = Tokenizer.load(os.path.join(data_dir, 'tokenizer.model'))
    special = meta['special_ids']
    task_data = SimpleNamespace(device=device, dtype=dtype, autocast=autocast_context(device, dtype), meta=meta,
                           tokenizer=tokenizer, special=special, pad_id=special['eot'],
                           char_counts=load_char_counts(data_dir), label_names=meta.get('label_names', []),
                           room=model_args['block_size'] - cfg.n_prompt)
    task_data.label_ids = [tokenizer.encode(cfg.label_template.format(name)) for name in task_data.label_names]
    task_data.examples, task_data.inputs = {}, {}
    for split in ('train', 'val', 'test'):
        examples = load_split(data_dir, split) if os.path.exists(os.path.join(data_dir, f"{split}.bin")) else []
        if cfg.task != 'dialogue':  # the other tasks need a label
            examples = [ex for ex in examples if ex['label'] >= 0]
        task_data.examples[split] = examples
        task_data.inputs[split] = [build_input(ex, cfg, task_data.room, special,
                                          task_data.label_ids[ex['label']] if cfg.task == 'label_text' else None)
                              for ex in examples]
    if not task_data.inputs['val']:  # a set without its own validation split validates on a slice of train
        n_val = max(len(task_data.inputs['train']) // 10, 1)
        inputs = task_data.inputs
        inputs['val'], inputs['train'] = inputs['train'][:n_val], inputs['train'][n_val:]
    return task_data
