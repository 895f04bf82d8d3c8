"""
Generate text with a trained model: a pretraining run, a fine-tuned run or a p-tuned one (whose
prompt.pt loads its base checkpoint by itself).

    python sample.py --prompt "发烧三天了怎么办"                   # continue a text
    python sample.py --dialogue --prompt "孩子发烧三天，咳嗽"        # the doctor's reply to a patient
    python sample.py --out_dir=out-ptune --dialogue --interactive  # a consultation: patient turns from stdin
"""
import math
import os
import sys
from types import SimpleNamespace

import torch

from checkpoint import load_model
from common import autocast_context, resolve_device_and_dtype
from configurator import configure

DEFAULTS = dict(
    out_dir='out/tiny',     # a run directory (prompt.pt, best.pt or ckpt.pt in it; default: the quick start's) ...
    checkpoint='',          # ... or this checkpoint / p-tuning file
    base='',                # a p-tuning file's base checkpoint ('' = the path the file recorded)
    data_dir='',            # checkpoints without a tokenizer record only: where tokenizer.model is
                            # ('' = data/<dataset the run trained on>)
    prompt='发烧三天了，还有点咳嗽，需要去医院吗？',  # '' = from the start of a text
    dialogue=False,         # the prompt is a patient's turn: generate the doctor's reply
    interactive=False,      # with --dialogue: read further patient turns from stdin, keeping the history
    num_samples=1,
    max_new_tokens=200,
    temperature=0.8,        # 0 = greedy
    top_k=50,               # 0 = off
    top_p=0.95,             # 1.0 = off
    repetition_penalty=1.0,  # > 1 lowers every token already in the context or reply (1.0 = off), as Hugging Face's
    no_repeat_ngram_size=0,  # > 0: no n-gram of this size appears twice in context + reply (0 = off)
    seed=1337,
    device='auto',
    stream=True,            # print the tokens as they are generated
)


def check_options(cfg):
    """Every sampling option in range, before anything loads (a negative temperature would sample
    the least likely tokens; top_p = 0 keeps no token at all)."""
    rules = [
        ('temperature', math.isfinite(cfg.temperature) and cfg.temperature >= 0, 'a number >= 0 (0 = greedy)'),
        ('top_k', cfg.top_k >= 0, '>= 0 (0 = off)'),
        ('top_p', 0 < cfg.top_p <= 1, 'in (0, 1] (1 = off)'),
        ('repetition_penalty', math.isfinite(cfg.repetition_penalty) and cfg.repetition_penalty > 0,
         'a number > 0 (1 = off)'),
        ('no_repeat_ngram_size', cfg.no_repeat_ngram_size >= 0, '>= 0 (0 = off)'),
        ('num_samples', cfg.num_samples >= 1, '>= 1'),
        ('max_new_tokens', cfg.max_new_tokens >= 0, '>= 0'),
    ]
    for key, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"--{key} must be {allowed}, not {getattr(cfg, key)}")
    if cfg.dialogue and not cfg.interactive and not cfg.prompt.strip():
        raise SystemExit("--dialogue needs the patient's turn: give --prompt=... (or --interactive to type turns)")


def load_tools(checkpoint, model, cfg):
    """Tokenizer, and the tagger when the model reads tags (the same one prepare/ tagged the training data with).
    The tokenizer is the one the checkpoint carries; only a checkpoint without a tokenizer record reads
    data_dir's, and only when its vocabulary is the model's size."""
    from tagging import Tagger, lexicon_dir
    from tokenizer import Tokenizer
    if checkpoint.get('tokenizer'):  # (None: trained on a data folder without a tokenizer file)
        tokenizer = Tokenizer.from_bytes(checkpoint['tokenizer']['data'])
    else:
        data_dir = cfg.data_dir or os.path.join('data', checkpoint.get('config', {}).get('dataset', 'pretrain'))
        tokenizer_path = os.path.join(data_dir, 'tokenizer.model')
        if not os.path.isfile(tokenizer_path):
            raise SystemExit(f"no tokenizer at {tokenizer_path}: give --data_dir (a folder that prepare/ built)")
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise SystemExit(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model has "
                             f"{model.config.vocab_size}: this checkpoint carries no tokenizer, so give "
                             f"--data_dir=<the data folder it was trained on>")
    needs_tags = model.config.n_lexical or model.config.n_entity
    return tokenizer, Tagger(lexicon_dir()) if needs_tags else None


def encode_context(text, tokenizer, tagger, model):
    """Token ids and (when the model has the tables) lexical and entity ids, as (1, T) tensors. An empty
    text starts from <eot>: every pretraining document follows one, so what comes next is a new text (a
    BERT-vocabulary model, as UER trained it, starts every document with [CLS] instead)."""
    if not text:
        ids = lexical = entity = [tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id]  # tag 0
    elif tagger is None:  # (the tagger puts [CLS] in front itself, as it did for the training data)
        ids, lexical, entity = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text), None, None
    else:
        ids, lexical, entity = tagger.encode(tokenizer, text)
    as_row = lambda xs: None if xs is None else torch.tensor([list(xs)], dtype=torch.long)
    cfg = model.config
    return as_row(ids), as_row(lexical) if cfg.n_lexical else None, as_row(entity) if cfg.n_entity else None


def crop_to_context(idx, lexical, entity, room, max_new_tokens):
    """Keep the newest tokens when the prompt would leave no room to generate (with a warning)."""
    keep = max(room - max_new_tokens, room // 2)
    if idx.size(1) <= keep:
        return idx, lexical, entity
    print(f"warning: the prompt has {idx.size(1)} tokens; keeping its last {keep} "
          f"(context {room} tokens, {max_new_tokens} to generate)", file=sys.stderr)
    crop = lambda x: None if x is None else x[:, -keep:]
    return crop(idx), crop(lexical), crop(entity)


def render(tokenizer, ids):
    """The text of generated ids for a reader: a speaker piece starts a new line labelled 病人： or 医生：,
    the separator a new line (generation ends at <eot>, so it is never among the ids)."""
    marks = {tokenizer.patient_id: '\n病人：', tokenizer.doctor_id: '\n医生：', tokenizer.sep_id: '\n'}
    parts, pending = [], []
    for token in ids:
        if token in marks:
            parts += [tokenizer.decode(pending), marks[token]]
            pending = []
        else:
            pending.append(token)
    return ''.join(parts + [tokenizer.decode(pending)])


class StreamPrinter:
    """Prints a sample's text as its tokens arrive. A character made of several byte pieces is
    printed once all of them are there (decoding half of it gives the replacement character)."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids, self.shown = [], 0

    def __call__(self, next_id):
        token = next_id[0, 0].item()
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = render(self.tokenizer, self.ids)
        if not text.endswith('\ufffd'):
            print(text[self.shown:], end='', flush=True)
            self.shown = len(text)


def generate_reply(model, context, tools, cfg, checkpoint, autocast, generator):
    """Generate num_samples continuations of context; returns their texts."""
    tokenizer, tagger = tools
    eot = tokenizer.eot_id
    # a reply ends where the next turn begins; a plain continuation only at the end of the text
    stop_ids = [eot, tokenizer.patient_id, tokenizer.doctor_id] if cfg.dialogue else [eot]
    idx, lexical, entity = encode_context(context, tokenizer, tagger, model)
    room = model.config.block_size - model.config.n_prompt
    idx, lexical, entity = crop_to_context(idx, lexical, entity, room, cfg.max_new_tokens)
    prompt_pos = None
    if model.config.n_prompt and checkpoint.get('config', {}).get('prompt_position') == 'infix':
        prompt_pos = torch.tensor([idx.size(1)])  # between the source and what is generated
    device = next(model.parameters()).device
    to = lambda x: None if x is None else x.to(device)
    texts = []
    for _ in range(cfg.num_samples):
        if cfg.stream and not cfg.dialogue:
            print(context, end='', flush=True)
        with autocast:
            out = model.generate(to(idx), cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1.0 else None,
                                 lexical=to(lexical), entity=to(entity), prompt_pos=to(prompt_pos),
                                 eos_id=stop_ids, generator=generator, repetition_penalty=cfg.repetition_penalty,
                                 no_repeat_ngram_size=cfg.no_repeat_ngram_size, on_token=StreamPrinter(tokenizer, stop_ids) if cfg.stream else None)
        new = [t for t in out[0, idx.size(1):].tolist() if t not in stop_ids]
        texts.append(render(tokenizer, new))
        if cfg.stream:
            print('\n' + '-' * 40, flush=True)
    return texts


def dialogue_turns(cfg):
    """The patient's turns: the prompt, then (interactive) each non-empty line from stdin."""
    if cfg.prompt.strip():
        yield cfg.prompt
    if cfg.interactive:
        for line in sys.stdin:
            if line.strip():
                yield line.strip()


def main(argv=None):
    cfg = SimpleNamespace(**configure(DEFAULTS, argv))
    check_options(cfg)
    device, dtype, _ = resolve_device_and_dtype(cfg.device, 'auto')
    try:
        model, checkpoint = load_model(cfg.checkpoint or cfg.out_dir, device, base_path=cfg.base or None)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error))
    model.eval()
    autocast = autocast_context(device, dtype)
    tools = load_tools(checkpoint, model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if not cfg.dialogue:
        return generate_reply(model, cfg.prompt, tools, cfg, checkpoint, autocast, generator)
    history, replies = '', []
    for turn in dialogue_turns(cfg):
        history += f"<patient>{turn}<doctor>"
        if cfg.stream:
            print(f"病人：{turn}\n医生：", end='', flush=True)
        reply = generate_reply(model, history, tools, cfg, checkpoint, autocast, generator)[0]
        history += reply
        replies.append(reply)
    return replies


if __name__ == '__main__':
    main()
