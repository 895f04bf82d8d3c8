"""
Adapting a pretrained checkpoint to a task, the second half of CMed-GPT.

Full fine-tuning on COVID-DDC:      python finetune.py --init_from=out-tiny --dataset=covid --mode=full
P-tuning with 25 prompt vectors:    python finetune.py --init_from=out-tiny --mode=ptune --n_prompt=25
  ... entity-aware (CMed-GPT):      python finetune.py --init_from=out-tiny --mode=ptune --n_prompt=25 --lexical --entity
  ... prompt between source and target (BioGPT):  --prompt_position=infix
Department classification:          python finetune.py --init_from=out-tiny --dataset=department --task=classify
  ... multitask (MEDI-BERPT):       --task=multitask --lambda_lm=1.0
  ... label as text (BioGPT):       --task=label_text
The base model alone (no adaptation): --mode=none

Reads data/<dataset>/ (built by prepare/). Writes out_dir/ckpt.pt (full) or out_dir/prompt.pt (p-tuning:
only what was trained, plus the base checkpoint's fingerprint), and appends one JSON line of test
results to out_dir/results.jsonl.
"""
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

from checkpoint import load_checkpoint, save_checkpoint, save_adapted, load_model
from configurator import configure
from model import GPT, GPTConfig
from train import autocast_context, learning_rate_at, load_char_counts, resolve_device_and_dtype

DEFAULTS = dict(
    init_from='out/tiny',       # out_dir of the pretraining run to adapt (default: the quick start's)
    init_checkpoint='best.pt',  # which of its checkpoints
    out_dir='out/finetune',
    dataset='covid',            # data/<dataset>/: covid, dxy or department
    mode='full',                # 'full' (every weight trains), 'ptune' (only the prompt), 'none' (evaluate the base)
    task='dialogue',            # 'dialogue', 'classify', 'multitask' (classify + lambda_lm * LM) or 'label_text'
    n_prompt=0,                 # soft-prompt vectors (the paper sweeps 1, 25, 50, 75, 100); p-tuning needs > 0
    prompt_position='prefix',   # 'prefix' (CMed-GPT) or 'infix' (between source and target, BioGPT)
    prompt_reparam='none',      # 'none', 'mlp' or 'lstm' (P-tuning's re-parameterisation)
    prompt_init='random',       # 'random' or 'tokens' (embeddings of real tokens drawn from the training text)
    lexical=False,              # feed part-of-speech ids (the table is added, zero-initialised, if the base has none)
    entity=False,               # feed entity ids (likewise)
    entity_splice=False,        # baseline: append the source's entity words as text instead
    lambda_lm=1.0,              # multitask: loss = class loss + lambda_lm * LM loss on the answer
    label_template='这属于{}。',  # label_text: the target sentence for a label
    epochs=6,                   # paper: 6 epochs
    max_iters=0,                # > 0 overrides epochs
    batch_size=8,
    learning_rate=0.0,          # 0 = by mode: 5e-5 for full fine-tuning (paper), 3e-3 for p-tuning
    warmup_iters=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=0.5,
    dropout=0.1,
    eval_interval=200,          # evaluate on val (and keep the best) every this many iterations
    max_eval_examples=0,        # > 0: evaluate val on at most this many examples (quick runs)
    log_interval=20,
    device='auto',
    dtype='auto',
    compile=False,
    seed=1337,
)
LR_BY_MODE = {'full': 5e-5, 'ptune': 3e-3}


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


# ----------------------------------------------------------------------------- model

def tag_table_size(tag_map):
    return max(tag_map.values()) + 1  # ids run 0..max, 0 = other / no entity


def build_model(cfg, base, meta):
    """The base model plus what the run adds (prompt, tag tables, class head), newcomers initialised so
    that the model computes the same function as the base at step 0 (a class head aside)."""
    model_args = dict(base['model_args'], dropout=cfg.dropout, n_prompt=cfg.n_prompt,
                      prompt_reparam=cfg.prompt_reparam,
                      n_classes=len(meta['label_names']) if cfg.task in ('classify', 'multitask') else 0)
    if cfg.lexical and not model_args['n_lexical']:
        model_args['n_lexical'] = tag_table_size(meta['lexical_map'])
    if cfg.entity and not model_args['n_entity']:
        model_args['n_entity'] = tag_table_size(meta['entity_map'])
    model = GPT(GPTConfig(**model_args))
    missing, unexpected = model.load_state_dict(base['model'], strict=False)
    foreign = [k for k in missing if not k.startswith(('wle.', 'wee.', 'prompt.', 'class_head.'))] + unexpected
    if foreign:
        raise ValueError(f"the base checkpoint does not fit the model: {', '.join(foreign)}")
    return model, model_args


def set_trainable(model, cfg, train_tokens, rng):
    if cfg.mode == 'none':  # evaluation only: nothing trains, and the count of trainable parameters says so
        model.requires_grad_(False)
    if cfg.mode == 'ptune':
        model.freeze_for_ptuning(train_lexical=cfg.lexical, train_entity=cfg.entity)
    if cfg.n_prompt and cfg.prompt_init == 'tokens':
        model.init_prompt_from_tokens(rng.choice(train_tokens, size=cfg.n_prompt))


def check_config(cfg):
    choices = dict(mode=('full', 'ptune', 'none'), task=('dialogue', 'classify', 'multitask', 'label_text'),
                   prompt_position=('prefix', 'infix'), prompt_init=('random', 'tokens'))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")
    if cfg.mode == 'ptune' and cfg.n_prompt == 0:
        raise SystemExit("--mode=ptune trains a soft prompt: give it --n_prompt > 0 (the paper uses 1 to 100)")
    if cfg.mode == 'none' and cfg.task in ('classify', 'multitask'):
        raise SystemExit("--mode=none cannot classify: the class head is new and must be trained")


# ----------------------------------------------------------------------------- evaluation

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
def evaluate(model, inputs, cfg, run):
    """Loss, perplexity and bits per character on target tokens; class loss, accuracy and macro-F1."""
    model.eval()
    nats = class_nats = 0.0
    n_tokens = n_chars = 0
    predictions, labels = [], []
    for chunk in in_batches(inputs, cfg.batch_size):
        batch = collate(chunk, cfg, run.pad_id, run.device)
        with run.autocast:
            h = model.encode(batch['idx'], batch.get('lexical'), batch.get('entity'), batch.get('prompt_pos'))
            if cfg.task != 'classify':
                scored = batch['targets'] != -1
                logits = model.lm_head(h[scored]).float()  # only the scored rows: (N, V)
                nats += F.cross_entropy(logits, batch['targets'][scored], reduction='sum').item()
                n_tokens += int(scored.sum())
                n_chars += int(run.char_counts[batch['targets'][scored].cpu().numpy()].sum())
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
def label_text_accuracy(model, examples, cfg, run):
    """BioGPT's text-as-label: generate greedily after the question; correct when the generated
    sentence is exactly the label's sentence."""
    model.eval()
    sentences = [cfg.label_template.format(name) for name in run.label_names]
    longest = max(len(ids) for ids in run.label_ids) + 1
    question_cfg = SimpleNamespace(**dict(vars(cfg), task='classify'))
    predictions, labels = [], []
    for ex in examples:
        x = build_input(ex, question_cfg, run.room - longest, run.special)
        batch = collate([x], question_cfg, run.pad_id, run.device)
        with run.autocast:
            out = model.generate(batch['idx'], longest, temperature=0, lexical=batch.get('lexical'),
                                 entity=batch.get('entity'), prompt_pos=batch.get('prompt_pos'),
                                 eos_id=run.special['eot'])
        generated = out[0, batch['idx'].size(1):].tolist()
        text = run.tokenizer.decode([t for t in generated if t != run.special['eot']])
        predictions.append(sentences.index(text) if text in sentences else -1)
        labels.append(ex['label'])
    model.train()
    return dict(acc=float(np.mean(np.array(predictions) == labels)), f1=macro_f1(predictions, labels))


# ----------------------------------------------------------------------------- training

def training_batches(inputs, batch_size, rng):
    """Endless batches, each epoch a new seeded shuffle."""
    while True:
        order = rng.permutation(len(inputs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [inputs[j] for j in order[i:i + batch_size]]


def train(model, run, cfg):
    """Fine-tune or p-tune on run.inputs['train']; keeps and returns the state with the best val loss."""
    n_iters = cfg.max_iters or cfg.epochs * max(len(run.inputs['train']) // cfg.batch_size, 1)
    learning_rate = cfg.learning_rate or LR_BY_MODE[cfg.mode]
    schedule = SimpleNamespace(learning_rate=learning_rate, min_lr=learning_rate / 10, warmup_iters=cfg.warmup_iters,
                               lr_decay_iters=n_iters)
    optimizer = model.configure_optimizers(cfg.weight_decay, learning_rate, (cfg.beta1, cfg.beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')
    step = torch.compile(task_loss) if cfg.compile else task_loss
    batches = training_batches(run.inputs['train'], cfg.batch_size, np.random.default_rng(cfg.seed))
    best = dict(loss=float('inf'), state=None, iter=0)
    t0 = time.time()
    for it in range(n_iters + 1):
        if it % cfg.eval_interval == 0 or it == n_iters:
            metrics = evaluate(model, run.inputs['val'][:cfg.max_eval_examples or None], cfg, run)
            val_loss = selection_loss(metrics, cfg)
            print(f"iter {it}: val {format_metrics(metrics)}")
            if val_loss < best['loss']:
                best = dict(loss=val_loss, iter=it,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
        if it == n_iters:
            break
        for group in optimizer.param_groups:
            group['lr'] = learning_rate_at(it, schedule)
        with run.autocast:
            loss, _, _ = step(model, collate(next(batches), cfg, run.pad_id, run.device), cfg)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0:
            elapsed = time.time() - t0
            print(f"iter {it}/{n_iters}: loss {loss.item():.4f}, lr {learning_rate_at(it, schedule):.2e}, "
                  f"{elapsed:.0f}s, ETA {elapsed / (it + 1) * (n_iters - it):.0f}s")
    model.load_state_dict(best['state'])
    return best


def format_metrics(metrics):
    return ', '.join(f"{k} {v:.4f}" for k, v in metrics.items())


# ----------------------------------------------------------------------------- the run

def prepare_run(cfg, model_args, meta, data_dir, device, dtype):
    """Everything the loops need besides the model: device, tokenizer facts, model inputs per split."""
    from prepare.tokenizer import Tokenizer  # here: only runs that fine-tune need the tokenizer
    tokenizer = Tokenizer.load(os.path.join(data_dir, 'tokenizer.model'))
    special = meta['special_ids']
    run = SimpleNamespace(device=device, device_type='cuda' if device.startswith('cuda') else 'cpu', dtype=dtype,
                          tokenizer=tokenizer, special=special, pad_id=special['eot'],
                          char_counts=load_char_counts(data_dir), label_names=meta.get('label_names', []),
                          room=model_args['block_size'] - cfg.n_prompt)
    run.autocast = autocast_context(run.device_type, dtype)
    run.label_ids = [tokenizer.encode(cfg.label_template.format(name)) for name in run.label_names]
    run.examples, run.inputs = {}, {}
    for split in ('train', 'val', 'test'):
        examples = load_split(data_dir, split) if os.path.exists(os.path.join(data_dir, f"{split}.bin")) else []
        if cfg.task != 'dialogue':  # the other tasks need a label
            examples = [ex for ex in examples if ex['label'] >= 0]
        run.examples[split] = examples
        run.inputs[split] = [build_input(ex, cfg, run.room, special,
                                         run.label_ids[ex['label']] if cfg.task == 'label_text' else None)
                             for ex in examples]
    if not run.inputs['val']:  # a set without its own validation split validates on a slice of train
        n_val = max(len(run.inputs['train']) // 10, 1)
        run.inputs['val'], run.inputs['train'] = run.inputs['train'][:n_val], run.inputs['train'][n_val:]
    return run


def save_result(model, model_args, cfg, base_path, base):
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.mode == 'ptune':
        save_adapted(os.path.join(cfg.out_dir, 'prompt.pt'), model, model_args, vars(cfg), base_path, base['model'])
    elif cfg.mode == 'full':
        save_checkpoint(dict(model=model.state_dict(), model_args=model_args, config=vars(cfg), base=base_path),
                        os.path.join(cfg.out_dir, 'ckpt.pt'))


def main(argv=None):
    t0 = time.time()
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    data_dir = cfg.dataset if os.path.isabs(cfg.dataset) else os.path.join('data', cfg.dataset)
    with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    base_path = os.path.join(cfg.init_from, cfg.init_checkpoint)
    base = load_checkpoint(base_path, 'cpu')
    model, model_args = build_model(cfg, base, meta)
    run = prepare_run(cfg, model_args, meta, data_dir, device, dtype)
    train_tokens = np.concatenate([ex['tokens'] for ex in run.examples['train']])
    set_trainable(model, cfg, train_tokens, np.random.default_rng(cfg.seed))
    model.to(device)
    print(f"{cfg.mode}: {model.num_params(trainable_only=True):,} of {model.num_params():,} parameters train; "
          f"{len(run.inputs['train'])} train / {len(run.inputs['val'])} val / {len(run.inputs['test'])} test examples")
    best = train(model, run, cfg) if cfg.mode != 'none' else dict(loss=None, iter=0)
    save_result(model, model_args, cfg, base_path, base)
    test = evaluate(model, run.inputs['test'], cfg, run)
    if cfg.task == 'label_text':
        test.update(label_text_accuracy(model, run.examples['test'], cfg, run))
    result = dict(dataset=cfg.dataset, mode=cfg.mode, task=cfg.task, n_prompt=cfg.n_prompt,
                  prompt_position=cfg.prompt_position, prompt_reparam=cfg.prompt_reparam, lexical=cfg.lexical,
                  entity=cfg.entity, entity_splice=cfg.entity_splice, lambda_lm=cfg.lambda_lm,
                  init_from=cfg.init_from, trainable_params=model.num_params(trainable_only=True),
                  total_params=model.num_params(), best_val_loss=best['loss'], best_iter=best['iter'],
                  **{f"test_{k}": v for k, v in test.items()}, wall_time_s=round(time.time() - t0, 1), seed=cfg.seed)
    print(json.dumps(result, ensure_ascii=False))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, 'results.jsonl'), 'a', encoding='utf-8') as f:
        f.write(json.dumps(result, ensure_ascii=False) + '\n')
    return result


if __name__ == '__main__':
    main()
