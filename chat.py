"""
Talking to a model, shared by sample.py and serve.py: a checkpoint loaded with the tokenizer and tagger it was
trained with, a text encoded as the model reads it, a continuation generated, and generated ids rendered as text.

A consultation is text with speaker pieces, as the fine-tuning sets hold it: <patient>…<doctor>…<patient>…<doctor>,
and the doctor's reply is what the model writes after the last <doctor>, until it starts the next turn.
ChatModel.reply answers a consultation given as turns: cropped to the context from its oldest turn, the reply cut
at stop strings, and its text handed on piece by piece as it is generated (serve.py streams those pieces).
"""

import os
import sys

import torch

from checkpoint import load_model
from common import autocast_context, resolve_device_and_dtype, until_stop


class ChatModel:
    """A model ready to generate: its weights (eval mode) on a device, with the tokenizer and the tagger it was
    trained with. path: a checkpoint, a p-tuning file or a run directory (checkpoint.load_model); base: a
    p-tuning file's base ('' = the path the file recorded); data_dir: see load_tools."""

    def __init__(self, path, base='', data_dir='', device='auto'):
        self.device, self.dtype, _ = resolve_device_and_dtype(device, 'auto')
        try:
            model, self.checkpoint = load_model(path, self.device, base_path=base or None)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(str(error))
        self.model = model.eval()
        self.tokenizer, self.tagger = load_tools(self.checkpoint, model, data_dir)
        self.room = model.config.block_size - model.config.n_prompt  # tokens of context beside the soft prompt
        # a BioGPT-style prompt sits between the source and what is generated
        self.infix = bool(model.config.n_prompt) and self.checkpoint.get('config', {}).get('prompt_position') == 'infix'
        # a doctor's reply ends where the next turn (or the text) begins
        self.turn_end_ids = [self.tokenizer.eot_id, self.tokenizer.patient_id, self.tokenizer.doctor_id]

    def encode(self, text):
        return encode_context(text, self.tokenizer, self.tagger, self.model)

    def generate(self, context, max_new_tokens, stop_ids, decoding, generator=None, on_token=None, samples=1):
        """The ids of `samples` continuations of context ((idx, lexical, entity), as encode gives them), generated
        at once, each a list: the stop id that ended it (one of stop_ids) is its last, if one did. decoding: values for
        common.DECODING_RULES' options (top_k 0 and top_p 1 are off; an option not given is model.generate's default).
        on_token: see model.generate (ids (samples, 1))."""
        idx, lexical, entity = (None if x is None else x.expand(samples, -1) for x in context)  # (samples, T) each
        prompt_pos = torch.tensor([idx.size(1)]) if self.infix else None
        top_p = decoding.get('top_p', 1.0)
        options = dict(decoding, top_k=decoding.get('top_k') or None, top_p=top_p if top_p < 1.0 else None)

        def to(x):
            return None if x is None else x.to(self.device)

        tags = dict(lexical=to(lexical), entity=to(entity), prompt_pos=to(prompt_pos))
        with autocast_context(self.device, self.dtype):
            out = self.model.generate(
                to(idx), max_new_tokens, eos_id=stop_ids, generator=generator, on_token=on_token, **tags, **options
            )
        return [until_stop(row, stop_ids) for row in out[:, idx.size(1) :].tolist()]

    def encode_consultation(self, turns, max_new_tokens):
        """The model's input for turns [(speaker, text)], (idx, lexical, entity): <patient>…<doctor>…<doctor>, the
        reply to follow. It keeps at most prompt_budget tokens: the oldest turns go first, whole (the newest always
        stays), then crop_to_context cuts the oldest tokens of what is still too long."""
        pieces = [f'<{speaker}>{text}' for speaker, text in turns]
        lengths = [len(self.tokenizer.encode(piece)) for piece in pieces]
        keep = prompt_budget(self.room, max_new_tokens)
        first, total = len(pieces) - 1, lengths[-1] + 1  # the newest turn, and the <doctor> after it
        while first > 0 and total + lengths[first - 1] <= keep:
            first -= 1
            total += lengths[first]
        if first:
            print(
                f"warning: the consultation has {len(pieces)} turns; keeping its newest {len(pieces) - first} "
                f"({total} tokens: context {self.room}, {max_new_tokens} to generate)",
                file=sys.stderr,
            )
        return crop_to_context(*self.encode(''.join(pieces[first:]) + '<doctor>'), self.room, max_new_tokens)

    def reply(self, turns, max_new_tokens, decoding, seed=None, stops=(), send=None, abort=None):
        """The doctor's reply to turns: (text, finish_reason, prompt tokens, reply tokens). finish_reason is 'stop'
        (a turn-ending piece, or one of the stop strings, which the text ends before) or 'length'; the reply's
        tokens do not count the piece that ended it. seed None: a seed from the system's randomness. send and
        abort: see Reply (abort() true stops the generation: Aborted is raised)."""
        context = self.encode_consultation(turns, max_new_tokens)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed % 2**64)
        reply = Reply(self.tokenizer, self.turn_end_ids, stops, send, abort)
        try:
            self.generate(context, max_new_tokens, self.turn_end_ids, decoding, generator, on_token=reply)
            reply.flush(len(reply.text))
        except StopStringFound:
            pass
        return reply.text, reply.finish, context[0].size(1), len(reply.ids)


def load_tools(checkpoint, model, data_dir=''):
    """Tokenizer, and the tagger when the model reads tags (the same one prepare/ tagged the training data with).
    The tokenizer is the one the checkpoint carries; only a checkpoint without a tokenizer record reads
    data_dir's, and only when its vocabulary is the model's size."""
    from tagging import Tagger, lexicon_dir
    from tokenizer import Tokenizer

    if checkpoint.get('tokenizer'):  # (None: trained on a data folder without a tokenizer file)
        tokenizer = Tokenizer.from_bytes(checkpoint['tokenizer']['data'])
    else:
        data_dir = data_dir or os.path.join('data', checkpoint.get('config', {}).get('dataset', 'pretrain'))
        tokenizer_path = os.path.join(data_dir, 'tokenizer.model')
        if not os.path.isfile(tokenizer_path):
            raise SystemExit(f"no tokenizer at {tokenizer_path}: give --data_dir (a folder that prepare/ built)")
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise SystemExit(
                f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model has "
                f"{model.config.vocab_size}: this checkpoint carries no tokenizer, so give "
                f"--data_dir=<the data folder it was trained on>"
            )
    needs_tags = model.config.n_lexical or model.config.n_entity
    return tokenizer, Tagger(lexicon_dir(), normalize=tokenizer.normalize) if needs_tags else None


def encode_context(text, tokenizer, tagger, model):
    """Token ids and (when the model has the tables) lexical and entity ids, as (1, T) tensors. An empty
    text starts from <eot>: every pretraining document follows one, so what comes next is a new text (a
    BERT-vocabulary model, as UER trained it, starts every document with [CLS] instead)."""
    if not text:
        ids = lexical = entity = [tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id]  # tag 0
    elif tagger is None:  # (the tagger puts [CLS] in front itself, as it did for the training data)
        ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
        lexical = entity = None
    else:
        ids, lexical, entity = tagger.encode(tokenizer, text)

    def as_row(xs):
        return None if xs is None else torch.tensor([list(xs)], dtype=torch.long)

    cfg = model.config
    return as_row(ids), as_row(lexical) if cfg.n_lexical else None, as_row(entity) if cfg.n_entity else None


def prompt_budget(room, max_new_tokens):
    """The most tokens a prompt keeps: room for max_new_tokens after it, but never less than half the context
    (a longer generation then slides the context along: model.generate crops its oldest tokens)."""
    return max(room - max_new_tokens, room // 2)


def crop_to_context(idx, lexical, entity, room, max_new_tokens):
    """Keep the newest tokens when the prompt would leave no room to generate (with a warning)."""
    keep = prompt_budget(room, max_new_tokens)
    if idx.size(1) <= keep:
        return idx, lexical, entity
    print(
        f"warning: the prompt has {idx.size(1)} tokens; keeping its last {keep} "
        f"(context {room} tokens, {max_new_tokens} to generate)",
        file=sys.stderr,
    )

    def crop(x):
        return None if x is None else x[:, -keep:]

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


# ----------------------------------------------------------------------------- a reply as it is generated


class Aborted(Exception):
    """Raised from a generation's on_token when its reply is no longer wanted; args[0]: the tokens generated."""


class StopStringFound(Exception):
    """Raised from on_token when the reply has reached a stop string: it ends there."""


def first_stop(text, stops):
    """Where the first stop string in text begins, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def held_back(text, stops):
    """Characters at the end of text that wait for the next token before they are sent: an unfinished character
    (the bytes of it generated so far decode to U+FFFD), or what may be the beginning of a stop string."""
    hold = len(text) - len(text.rstrip('\ufffd'))
    for stop in stops:
        hold = max([hold] + [k for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])])
    return hold


class Reply:
    """A reply as its tokens arrive (model.generate's on_token): its tokens and text so far, how much of the text
    was sent, and why it ended ('stop': a turn-ending piece or a stop string; 'length': max_new_tokens). send(text),
    when given, gets each piece of the text as soon as no later token can change it; abort(), when given, is asked
    at every token, and a true answer (or an OSError from send: the reader is gone) stops the generation."""

    def __init__(self, tokenizer, stop_ids, stops, send=None, abort=None):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, stop_ids, stops
        self.send, self.abort = send, abort
        self.ids, self.text, self.sent, self.finish = [], '', 0, 'length'

    def __call__(self, next_id):
        if self.abort is not None and self.abort():
            raise Aborted(len(self.ids))
        token = next_id[0, 0].item()
        if token in self.stop_ids:  # the next turn begins: the generation stops after this token
            self.finish = 'stop'
            return
        self.ids.append(token)
        self.text = render(self.tokenizer, self.ids)
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.text, self.finish = self.text[:cut], 'stop'
            self.flush(len(self.text))
            raise StopStringFound
        self.flush(len(self.text) - held_back(self.text, self.stops))

    def flush(self, end):
        """Send the text up to end (what was not sent yet)."""
        if self.send is not None and end > self.sent:
            try:
                self.send(self.text[self.sent : end])
            except OSError:  # a broken pipe, a reset connection, a reader that stopped reading
                raise Aborted(len(self.ids)) from None
            self.sent = end
