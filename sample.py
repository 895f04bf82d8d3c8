"""
Generate text with a trained model: a pretraining run, a fine-tuned run or a p-tuned one (whose
prompt.pt loads its base checkpoint by itself).

    python sample.py --prompt "发烧三天了怎么办"                   # continue a text
    python sample.py --num_samples=16 --batch_size=16             # 16 continuations generated at once
    python sample.py --dialogue --prompt "孩子发烧三天，咳嗽"        # the doctor's reply to a patient
    python sample.py --out_dir=out-ptune --dialogue --interactive  # a consultation: patient turns from stdin
"""

import sys
from types import SimpleNamespace

import torch

from chat import ChatModel, crop_to_context, render
from common import DECODING_RULES, check_decoding
from configurator import configure

# fmt: off
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
    batch_size=8,           # samples generated at once (a batch of more than one is printed when it ends)
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
# fmt: on


def check_options(cfg):
    """Every option in range, before anything loads."""
    check_decoding(cfg)
    rules = [(key, getattr(cfg, key) >= 1, '>= 1') for key in ('num_samples', 'batch_size')]
    rules += [('max_new_tokens', cfg.max_new_tokens >= 0, '>= 0')]
    for key, ok, allowed in rules:
        if not ok:
            raise SystemExit(f"--{key} must be {allowed}, not {getattr(cfg, key)}")
    if cfg.dialogue and not cfg.interactive and not cfg.prompt.strip():
        raise SystemExit("--dialogue needs the patient's turn: give --prompt=... (or --interactive to type turns)")


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
            print(text[self.shown :], end='', flush=True)
            self.shown = len(text)


def generate_reply(chat, context, cfg, generator):
    """Generate num_samples continuations of context, batch_size at a time; returns their texts."""
    # a reply ends where the next turn begins; a plain continuation only at the end of the text
    stop_ids = chat.turn_end_ids if cfg.dialogue else [chat.tokenizer.eot_id]
    idx, lexical, entity = crop_to_context(*chat.encode(context), chat.room, cfg.max_new_tokens)
    decoding = {key: getattr(cfg, key) for key in DECODING_RULES}
    shown = '' if cfg.dialogue else context  # (main prints a dialogue's turn itself)
    texts = []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        samples = min(cfg.batch_size, cfg.num_samples - start)
        streamed = cfg.stream and samples == 1  # a batch of one shows its tokens as they come
        if streamed:
            print(shown, end='', flush=True)
        batch = chat.generate(
            (idx, lexical, entity),
            cfg.max_new_tokens,
            stop_ids,
            decoding,
            generator,
            on_token=StreamPrinter(chat.tokenizer, stop_ids) if streamed else None,
            samples=samples,
        )
        for new in batch:
            texts.append(render(chat.tokenizer, [t for t in new if t not in stop_ids]))
            if cfg.stream:
                print(('' if streamed else shown + texts[-1]) + '\n' + '-' * 40, flush=True)
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
    chat = ChatModel(cfg.checkpoint or cfg.out_dir, cfg.base, cfg.data_dir, cfg.device)
    generator = torch.Generator(device=chat.device).manual_seed(cfg.seed)
    if not cfg.dialogue:
        return generate_reply(chat, cfg.prompt, cfg, generator)
    history, replies = '', []
    for turn in dialogue_turns(cfg):
        history += f"<patient>{turn}<doctor>"
        if cfg.stream:
            print(f"病人：{turn}\n医生：", end='', flush=True)
        reply = generate_reply(chat, history, cfg, generator)[0]
        history += reply
        replies.append(reply)
    return replies


if __name__ == '__main__':
    main()
