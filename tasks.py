"""
Fine-tuning tasks: how an example becomes a model input, the loss a run trains on, and how the model is scored.
finetune.py trains on a task (--task is a key of TASKS); eval.py and reproduce.py score with one.

The examples come from an example set (example_sets.py). Each task is one class with the same methods: inputs (an
example as a model input: cropped to the context, the target scored and nothing else, the soft prompt's position
and the token the class head reads), loss (training), evaluate (validation and test), selection_loss (the number
that picks the best model), check (refusals before training) and score_generated (what the model generates on the
test split).

    dialogue    CMed-GPT: the doctor's reply is the target; LM loss; loss, PPL, bits/char; generated replies
    classify    MEDI-BERPT's baseline: the question alone, read by a class head; accuracy, macro-F1
    multitask   MEDI-BERPT: both on the reply's input; loss = class loss + lambda_lm * LM loss
    label_text  BioGPT: the label's sentence is the target; LM loss; accuracy of the greedily generated sentence

Every task honours the run's input options: entity splicing (the source's entity words as text), the soft prompt
in front of the input or between source and target, lexical and entity ids.
"""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from common import DECODING_RULES, autocast_context, load_char_counts, until_stop
from example_sets import crop_window, load_split, splice_entities, with_label_target
from metrics import macro_f1, score_replies
from prepare.sources import atomic_write
from reply_entities import labelled_dialogue_examples, reply_spans, tagging_lexicon

# ----------------------------------------------------------------------------- the tasks


class Task:
    """What the tasks share. A task holds the run's settings (cfg: finetune.py's options) and says what
    the model needs, which examples it uses and how a batch is made and evaluated; each task adds its
    loss (training), tally (evaluation) and selection_loss (which validation number picks the best model)."""

    class_head = False  # the model needs a class head (one output per label)
    needs_labels = False  # only labelled examples are used
    generates_replies = False  # doctor replies can be generated and scored (without entity splicing)

    def __init__(self, cfg):
        self.cfg = cfg

    def spliced(self, ex, special):
        """(example, where its target starts), with the source's entity words spliced in if the run asks."""
        target_start = int(np.argmax(ex['mask']))
        if not self.cfg.entity_splice:
            return ex, target_start
        ex = splice_entities(ex, target_start, special['sep'])
        return ex, int(np.argmax(ex['mask']))

    def inputs(self, ex, room, special, label_sentences=()):
        """The model input of an example in at most room tokens, scoring its target: idx, targets (-1 where not
        scored), tags, prompt and class positions (the soft prompt goes after the source; the class head reads the
        source's last token). label_sentences: each label's sentence as token ids (the label_text task's targets)."""
        ex, target_start = self.spliced(ex, special)
        start, end = crop_window(len(ex['tokens']), target_start, room + 1)  # +1: inputs and targets shift by one
        seq = {k: ex[k][start:end] for k in ('tokens', 'lexical', 'entity', 'mask')}
        targets = np.where(seq['mask'][1:] == 1, seq['tokens'][1:], -1)  # score only the answer's tokens
        source_len = target_start - start
        return dict(
            idx=seq['tokens'][:-1],
            targets=targets,
            lexical=seq['lexical'][:-1],
            entity=seq['entity'][:-1],
            prompt_pos=source_len,
            class_pos=source_len - 1,
            label=ex['label'],
        )

    def question(self, ex, room, special):
        """The source alone (everything before the answer, up to <doctor>), nothing scored: the model input to
        classify, or to generate the answer from."""
        ex, target_start = self.spliced(ex, special)
        start, _ = crop_window(target_start, target_start, room)
        seq = {k: ex[k][start:target_start] for k in ('tokens', 'lexical', 'entity')}
        n = len(seq['tokens'])
        return dict(
            idx=seq['tokens'],
            targets=None,
            lexical=seq['lexical'],
            entity=seq['entity'],
            prompt_pos=n,
            class_pos=n - 1,
            label=ex['label'],
        )

    def collate(self, inputs, pad_id, device, left=False):
        """Pad a list of inputs into batch tensors: on the right (padding is never scored), or with left=True on
        the left, for model.generate (batch['left_pad']: each row's padding, which the positions count)."""
        T = max(len(x['idx']) for x in inputs)
        n_pad = [T - len(x['idx']) for x in inputs]
        shift = n_pad if left else [0] * len(inputs)  # where a row's tokens start

        def pad(key, value):
            rows = [np.pad(x[key], (s, n - s), constant_values=value) for x, n, s in zip(inputs, n_pad, shift)]
            return torch.from_numpy(np.stack(rows)).to(device)

        batch = dict(
            idx=pad('idx', pad_id),
            class_pos=torch.tensor([x['class_pos'] + s for x, s in zip(inputs, shift)], device=device),
            labels=torch.tensor([x['label'] for x in inputs], device=device),
        )
        if left:
            batch['left_pad'] = torch.tensor(n_pad, device=device)
        if inputs[0]['targets'] is not None:
            batch['targets'] = pad('targets', -1)
        if self.cfg.lexical:
            batch['lexical'] = pad('lexical', 0)
        if self.cfg.entity:
            batch['entity'] = pad('entity', 0)
        if self.cfg.n_prompt and self.cfg.prompt_position == 'infix':
            batch['prompt_pos'] = torch.tensor([x['prompt_pos'] + s for x, s in zip(inputs, shift)], device=device)
        return batch

    @torch.no_grad()
    def evaluate(self, model, inputs, task_data):
        """The task's metrics over inputs (see tally), in batches of batch_size in a fixed order."""
        model.eval()
        totals = dict(nats=0.0, tokens=0, chars=0, class_nats=0.0, predictions=[], labels=[])
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]['idx']))  # similar lengths: little padding
        for i in range(0, len(order), self.cfg.batch_size):
            batch = self.collate(
                [inputs[j] for j in order[i : i + self.cfg.batch_size]], task_data.pad_id, task_data.device
            )
            with task_data.autocast:
                self.tally(model, encode(model, batch), batch, task_data, totals)
        model.train()
        return metrics_of(totals)

    def generate(self, model, examples, task_data, max_new_tokens, stop_ids, **sampling):
        """The tokens the model generates after each example's source (cropped to leave them room), up to and with
        the first of stop_ids, in the examples' order. The sources go batch_size at a time, sorted by length so that
        little padding is spent; greedy replies are those of one source at a time."""
        questions = [self.question(ex, task_data.room - max_new_tokens, task_data.special) for ex in examples]
        order = sorted(range(len(questions)), key=lambda i: len(questions[i]['idx']))
        replies = [None] * len(questions)
        with tqdm(total=len(questions), desc='generate', unit='reply', mininterval=2) as progress:
            for start in range(0, len(order), self.cfg.batch_size):
                rows = order[start : start + self.cfg.batch_size]
                batch = self.collate([questions[i] for i in rows], task_data.pad_id, task_data.device, left=True)
                inputs = {key: batch.get(key) for key in ('lexical', 'entity', 'prompt_pos', 'left_pad')}
                with task_data.autocast:
                    out = model.generate(batch['idx'], max_new_tokens, eos_id=stop_ids, **inputs, **sampling)
                for i, reply in zip(rows, out[:, batch['idx'].size(1) :].tolist()):
                    replies[i] = until_stop(reply, stop_ids)
                progress.update(len(rows))
        return replies

    def check(self, task_data, data_dir):
        """Refuse, before training, a data set the task cannot learn from."""
        if self.needs_labels and not task_data.label_names:
            raise SystemExit(
                f"--task={self.cfg.task} needs a labelled data set (e.g. department), and {data_dir} has no labels"
            )

    def score_generated(self, model, examples, task_data):
        """Scores of what the model generates for examples' sources (the test split): none for this task."""
        return {}


class Dialogue(Task):
    """CMed-GPT: the doctor's reply is the target, scored by the LM head: loss, PPL, bits per character;
    with --generate_examples, replies to test sources (greedy or sampled) scored against the references."""

    generates_replies = True

    def loss(self, model, batch):
        """(loss, LM loss, class loss); None for a part the task does not train."""
        _, lm_loss = model.lm_head_loss(encode(model, batch), batch['targets'])
        return lm_loss, lm_loss, None

    def tally(self, model, h, batch, task_data, totals):
        tally_targets(model, h, batch, task_data, totals)

    def selection_loss(self, metrics):
        """The validation number that picks the best model: the training objective's."""
        return metrics['loss']

    def check(self, task_data, data_dir):
        super().check(task_data, data_dir)
        if self.cfg.generate_examples and task_data.room - self.cfg.max_new_tokens < 2:
            raise SystemExit(
                f"--max_new_tokens={self.cfg.max_new_tokens} leaves no room for a source in the "
                f"{task_data.room} tokens of the context: generate fewer tokens"
            )

    def score_generated(self, model, examples, task_data):
        if not self.cfg.generate_examples:
            return {}
        return self.reply_scores(
            model,
            task_data,
            examples[: self.cfg.generate_examples],
            self.cfg.max_new_tokens,
            **{key: getattr(self.cfg, key) for key in DECODING_RULES},
            seed=self.cfg.seed,
            replies_path=os.path.join(self.cfg.out_dir, 'replies.jsonl'),
        )

    def reply_scores(
        self,
        model,
        task_data,
        examples,
        max_new_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=1337,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        replies_path='',
    ):
        """Generate a reply for each example's source (greedy at temperature 0, else sampled with a seeded
        generator; the rules against loops as in model.generate) and score the replies against the references
        (metrics.py). replies_path: also write each source, reference and reply there, one JSON line each."""
        from tagging import Tagger

        tok = task_data.tokenizer
        stops = [tok.eot_id, tok.patient_id, tok.doctor_id]  # a reply ends where the next turn would begin
        generator = torch.Generator(device=task_data.device).manual_seed(seed)
        sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p if top_p < 1.0 else None)
        sampling.update(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        model.eval()
        replies = self.generate(model, examples, task_data, max_new_tokens, stops, generator=generator, **sampling)
        model.train()
        generated = [tok.decode([t for t in reply if t not in stops]) for reply in replies]
        starts = [int(np.argmax(ex['mask'])) for ex in examples]  # where each reference (the target) begins
        targets = [ex['tokens'][start:].tolist() for ex, start in zip(examples, starts)]
        references = [tok.decode([t for t in target if t not in stops]) for target in targets]
        if replies_path:  # written whole or not at all
            sources = [tok.decode(ex['tokens'][:start].tolist()) for ex, start in zip(examples, starts)]
            lines = [
                json.dumps(dict(source=source, reference=reference, reply=reply), ensure_ascii=False) + '\n'
                for source, reference, reply in zip(sources, references, generated)
            ]
            atomic_write(replies_path, ''.join(lines).encode())
        marked = [reply_spans(tok, ex) for ex in examples]  # the entity spans of each reference
        gold_terms = None
        if task_data.meta.get('entity_source') == 'gold':  # the set's own labels: see metrics.py
            # the vocabulary: what annotators marked in the training replies of the labelled dialogues (the
            # unlabelled ones carry lexicon tags)
            labelled = labelled_dialogue_examples(task_data.examples['train'])
            gold_terms = set().union(*(reply_spans(tok, ex) for ex in labelled))
        tagger = Tagger(tagging_lexicon(task_data.meta), normalize=tok.normalize)  # terms spelt as the replies are
        return score_replies(generated, references, tagger, marked, gold_terms)


class Classify(Task):
    """MEDI-BERPT's baseline: the question alone, its last token read by a class head; class loss,
    accuracy and macro-F1."""

    class_head = True
    needs_labels = True

    def inputs(self, ex, room, special, label_sentences=()):
        return self.question(ex, room, special)

    def loss(self, model, batch):
        _, class_loss = model.classify(encode(model, batch), batch['class_pos'], batch['labels'])
        return class_loss, None, class_loss

    def tally(self, model, h, batch, task_data, totals):
        tally_classes(model, h, batch, totals)

    def selection_loss(self, metrics):
        return metrics['class_loss']


class Multitask(Task):
    """MEDI-BERPT: one input scores both the reply (LM head) and the label (class head on the source's last
    token): loss = class loss + lambda_lm * LM loss."""

    class_head = True
    needs_labels = True

    def loss(self, model, batch):
        h = encode(model, batch)
        _, lm_loss = model.lm_head_loss(h, batch['targets'])
        _, class_loss = model.classify(h, batch['class_pos'], batch['labels'])
        return class_loss + self.cfg.lambda_lm * lm_loss, lm_loss, class_loss

    def tally(self, model, h, batch, task_data, totals):
        tally_targets(model, h, batch, task_data, totals)
        tally_classes(model, h, batch, totals)

    def selection_loss(self, metrics):
        return metrics['class_loss'] + self.cfg.lambda_lm * metrics['loss']


class LabelText(Task):
    """BioGPT's text-as-label: the target is the label's sentence (--label_template), scored by the LM head;
    on the test split, correct when the sentence generated greedily after the question is exactly the label's."""

    needs_labels = True

    def inputs(self, ex, room, special, label_sentences=()):
        ex = with_label_target(ex, int(np.argmax(ex['mask'])), label_sentences[ex['label']], special['eot'])
        return super().inputs(ex, room, special)

    def loss(self, model, batch):
        _, lm_loss = model.lm_head_loss(encode(model, batch), batch['targets'])
        return lm_loss, lm_loss, None

    def tally(self, model, h, batch, task_data, totals):
        tally_targets(model, h, batch, task_data, totals)

    def selection_loss(self, metrics):
        return metrics['loss']

    def check(self, task_data, data_dir):
        super().check(task_data, data_dir)
        longest = max(map(len, task_data.label_ids), default=0) + 1  # a label sentence and <eot>
        if task_data.room <= longest:
            raise SystemExit(
                f"--n_prompt={self.cfg.n_prompt} leaves {task_data.room} tokens of the context, too "
                f"few for a question and the longest label sentence ({longest} tokens): "
                f"use fewer prompt vectors"
            )

    @torch.no_grad()
    def score_generated(self, model, examples, task_data):
        model.eval()
        sentences = [self.cfg.label_template.format(name) for name in task_data.label_names]
        longest = max(len(ids) for ids in task_data.label_ids) + 1
        eot = task_data.special['eot']
        replies = self.generate(model, examples, task_data, longest, [eot], temperature=0)
        texts = [task_data.tokenizer.decode([t for t in reply if t != eot]) for reply in replies]
        predictions = [sentences.index(text) if text in sentences else -1 for text in texts]
        labels = [ex['label'] for ex in examples]
        model.train()
        return dict(acc=float(np.mean(np.array(predictions) == labels)), f1=macro_f1(predictions, labels))


TASKS = {'dialogue': Dialogue, 'classify': Classify, 'multitask': Multitask, 'label_text': LabelText}


# ----------------------------------------------------------------------------- scoring


def encode(model, batch):
    return model.encode(batch['idx'], batch.get('lexical'), batch.get('entity'), batch.get('prompt_pos'))


def tally_targets(model, h, batch, task_data, totals):
    """Add the nats, tokens and characters of the batch's scored targets to totals."""
    scored = batch['targets'] != -1
    # the LM head on the scored positions only, as one row: (1, N, C) -> (1, N, V)
    _, nats_sum = model.lm_head_loss(h[scored][None], batch['targets'][scored][None], reduction='sum')
    totals['nats'] += nats_sum.item()
    totals['tokens'] += int(scored.sum())
    totals['chars'] += int(task_data.char_counts[batch['targets'][scored].cpu().numpy()].sum())


def tally_classes(model, h, batch, totals):
    """Add the class nats, predictions and labels of the batch to totals."""
    class_logits, _ = model.classify(h, batch['class_pos'])
    totals['class_nats'] += F.cross_entropy(class_logits.float(), batch['labels'], reduction='sum').item()
    totals['predictions'] += class_logits.argmax(-1).tolist()
    totals['labels'] += batch['labels'].tolist()


def metrics_of(totals):
    """Loss, perplexity and bits per character on target tokens; class loss, accuracy and macro-F1."""
    metrics, nats, n_tokens, labels = {}, totals['nats'], totals['tokens'], totals['labels']
    if n_tokens:
        metrics.update(
            loss=nats / n_tokens, ppl=math.exp(nats / n_tokens), bpc=nats / math.log(2) / max(totals['chars'], 1)
        )
    if labels:
        predictions = totals['predictions']
        metrics.update(
            class_loss=totals['class_nats'] / len(labels),
            acc=float(np.mean(np.array(predictions) == labels)),
            f1=macro_f1(predictions, labels),
        )
    return metrics


# ----------------------------------------------------------------------------- a task's data


def load_task_data(task, model_args, meta, data_dir, device, dtype):
    """What a fine-tuning run reads besides the model: tokenizer facts, precision, and the task's model
    inputs (and raw examples) of each split."""
    from tokenizer import Tokenizer  # here: only runs that fine-tune need the tokenizer

    tokenizer = Tokenizer.load(os.path.join(data_dir, 'tokenizer.model'))
    special = meta['special_ids']
    task_data = SimpleNamespace(
        device=device,
        dtype=dtype,
        autocast=autocast_context(device, dtype),
        meta=meta,
        tokenizer=tokenizer,
        special=special,
        pad_id=special['eot'],
        char_counts=load_char_counts(data_dir),
        label_names=meta.get('label_names', []),
        room=model_args['block_size'] - task.cfg.n_prompt,
    )
    task_data.label_ids = [tokenizer.encode(task.cfg.label_template.format(name)) for name in task_data.label_names]
    task_data.examples, task_data.inputs = {}, {}
    for split in ('train', 'val', 'test'):
        examples = load_split(data_dir, split) if os.path.exists(os.path.join(data_dir, f"{split}.bin")) else []
        if task.needs_labels:
            examples = [ex for ex in examples if ex['label'] >= 0]
        task_data.examples[split] = examples
        task_data.inputs[split] = [task.inputs(ex, task_data.room, special, task_data.label_ids) for ex in examples]
    if not task_data.inputs['val']:  # a set without its own validation split validates on a slice of train
        n_val = max(len(task_data.inputs['train']) // 10, 1)
        inputs = task_data.inputs
        inputs['val'], inputs['train'] = inputs['train'][:n_val], inputs['train'][n_val:]
    return task_data
