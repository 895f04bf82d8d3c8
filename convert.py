"""
Hugging Face GPT-2 folders in and out: start from GPT2-Chinese, hand models to transformers.

Import (a GPT2LMHeadModel folder: config.json, model.safetensors or pytorch_model.bin, vocab.txt):
    python convert.py --hf_dir=gpt2-distil-chinese --out_dir=out/gpt2_chinese
writes out_dir/best.pt (a normal checkpoint: train.py --init_from, finetune.py and sample.py read it) and, when
the folder has a vocab.txt, out_dir/tokenizer.model (the BERT vocabulary, see tokenizer.py), which best.pt
carries as every checkpoint does. Every file is read and checked before out_dir is touched, and out_dir is held
as train.py holds it: a folder in use by a run is refused, and one holding a run is replaced only with --overwrite.

Export (a checkpoint folder to a folder that GPT2LMHeadModel.from_pretrained loads):
    python convert.py --export --out_dir=out/base --hf_dir=hf/base
writes config.json, model.safetensors and the tokenizer the checkpoint carries (--tokenizer=PATH for one that
carries none): vocab.txt for a BERT-vocabulary model (BertTokenizer loads it), else the project's own
tokenizer.model with a note. GPT-2 has no lexical/entity tables, soft prompt or class head: a model with one is
refused unless --drop_extras, which leaves them out. hf_dir is written whole under a temporary name, then renamed:
a folder that holds anything is replaced only with --overwrite, and only if it is a model folder (config.json).

Hugging Face's Conv1D stores a linear map as (in, out), nn.Linear as (out, in): those matrices are transposed.
"""

import json
import os
import pickle

import torch

from checkpoint import (
    claim_out_dir,
    load_model,
    load_weights_only,
    refuse_previous_run,
    save_checkpoint,
    start_fresh,
    tokenizer_record,
)
from configurator import configure
from model import GPT, GPTConfig
from prepare.sources import DataError

DEFAULTS = dict(
    hf_dir='',  # the Hugging Face folder: read on import, written on export
    out_dir='',  # the checkpoint folder: written on import, read on export
    export=False,  # False: Hugging Face -> checkpoint; True: checkpoint -> Hugging Face
    drop_extras=False,  # export: leave out lexical/entity tables, soft prompt and class head
    tokenizer='',  # export, for a checkpoint that carries no tokenizer: the tokenizer.model to ship
    # ('' = out_dir's, where convert.py put an imported model's)
    overwrite=False,  # replace what the destination holds: a run in out_dir (import), a model in hf_dir (export)
)
ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}  # HF name -> ours
EXPORTED_ACTIVATION = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu'}
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
BUFFERS = ('attn.bias', 'attn.masked_bias')  # old transformers saved the causal mask with the weights
EXTRAS = {'wle': 'a lexical table', 'wee': 'an entity table', 'prompt': 'a soft prompt', 'class_head': 'a class head'}


# ----------------------------------------------------------------------------- names


def hf_name(name):
    """Our parameter name -> the GPT2LMHeadModel name ('blocks.0.attn.c_attn.weight' -> 'transformer.h.0...')."""
    if name.startswith('blocks.'):
        return 'transformer.h.' + name[len('blocks.') :]
    return 'transformer.' + name


def is_conv1d(name):
    return name.endswith(CONV1D)


# ----------------------------------------------------------------------------- import


def model_args_from_config(hf_config, path):
    """GPTConfig fields for a GPT-2 config.json; anything GPT-2 can set that this model does not compute is
    refused by name."""

    def need(key, ok, what):
        if not ok:
            raise ValueError(f"{path}: unsupported {key}={hf_config.get(key)!r} (this model needs {what})")

    need('model_type', hf_config.get('model_type') == 'gpt2', "a GPT-2 model, model_type 'gpt2'")
    for key in ('n_embd', 'n_head', 'n_layer', 'n_positions', 'vocab_size'):
        need(key, isinstance(hf_config.get(key), int) and hf_config[key] > 0, 'a positive integer')
    n_embd, n_head = hf_config['n_embd'], hf_config['n_head']
    need('n_inner', hf_config.get('n_inner') in (None, 4 * n_embd), f'n_inner = 4 * n_embd = {4 * n_embd}')
    need(
        'activation_function',
        hf_config.get('activation_function', 'gelu_new') in ACTIVATIONS,
        'one of ' + ', '.join(ACTIVATIONS),
    )
    need('layer_norm_epsilon', hf_config.get('layer_norm_epsilon', 1e-5) == 1e-5, '1e-5, torch LayerNorm\'s eps')
    need('scale_attn_weights', hf_config.get('scale_attn_weights', True), 'scores scaled by 1/sqrt(head size)')
    for key in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn', 'add_cross_attention'):
        need(key, not hf_config.get(key, False), 'it off')
    need('tie_word_embeddings', hf_config.get('tie_word_embeddings', True), 'the LM head tied to the token table')
    need('n_head', n_embd % n_head == 0, 'n_embd divisible by n_head')
    return dict(
        block_size=hf_config['n_positions'],
        vocab_size=hf_config['vocab_size'],
        n_layer=hf_config['n_layer'],
        n_head=n_head,
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        n_lexical=0,
        n_entity=0,
        attention='fused',
        activation=ACTIVATIONS[hf_config.get('activation_function', 'gelu_new')],
    )


def read_hf_config(hf_dir):
    """config.json as a dict, refused by name if it is missing, not JSON or not one JSON object."""
    path = os.path.join(hf_dir, 'config.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir}: give --hf_dir a Hugging Face GPT-2 folder")
    try:
        with open(path, encoding='utf-8') as f:
            hf_config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): get the model's config.json again") from None
    if not isinstance(hf_config, dict):
        raise ValueError(
            f"{path} holds a JSON {type(hf_config).__name__}, not an object of settings: get the "
            f"model's config.json again"
        )
    return hf_config, path


def read_hf_weights(hf_dir):
    """{name: tensor} from model.safetensors, else from pytorch_model.bin unpickled with weights_only=True."""
    path = os.path.join(hf_dir, 'model.safetensors')
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:  # e.g. an empty file, or one cut short by a failed download
            raise ValueError(
                f"{path} does not read as safetensors ({error}): it is truncated or damaged, download it again"
            ) from None
    path = os.path.join(hf_dir, 'pytorch_model.bin')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {hf_dir}")
    try:
        weights = load_weights_only(path)
    except pickle.UnpicklingError as error:  # weights_only refused something: it never ran
        reason = str(error).split('\n')[0]
        raise ValueError(
            f"{path}: refused, the pickle holds more than tensors and could run code ({reason}); "
            f"get a model.safetensors for this model instead"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:  # torch's reader on a file cut short
        raise ValueError(
            f"{path} does not read ({type(error).__name__}: {str(error).split('.')[0]}): it is "
            f"truncated or damaged, download it again"
        ) from None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} holds a {type(weights).__name__}, not a state dict")
    return weights


def state_from_hf(weights, model, path):
    """Our state dict from GPT2LMHeadModel (or GPT2Model) weights; every tensor accounted for."""
    if not any(k.startswith('transformer.') for k in weights):  # a bare GPT2Model: no 'transformer.' prefix
        weights = {('transformer.' + k if k != 'lm_head.weight' else k): v for k, v in weights.items()}
    expected = model.state_dict()
    state, used = {}, set()
    for name, ours in expected.items():
        if name == 'lm_head.weight':
            continue  # tied: the token table
        key = hf_name(name)
        if key not in weights:
            raise ValueError(f"{path}: missing tensor {key}")
        tensor = weights[key].t() if is_conv1d(name) else weights[key]
        if tensor.shape != ours.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(weights[key].shape)}, the config needs "
                f"{tuple(ours.t().shape if is_conv1d(name) else ours.shape)}"
            )
        state[name] = tensor.to(torch.float32).contiguous()
        used.add(key)
    state['lm_head.weight'] = state['wte.weight']
    if 'lm_head.weight' in weights:
        used.add('lm_head.weight')
        if not torch.equal(weights['lm_head.weight'].to(torch.float32), state['wte.weight']):
            raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight; this model ties them")
    unexpected = sorted(k for k in weights if k not in used and not k.endswith(BUFFERS))
    if unexpected:
        raise ValueError(
            f"{path}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else '')
        )
    return state


def read_vocab(hf_dir, vocab_size):
    """The bytes of tokenizer.model for the folder's vocab.txt (None without one), refused unless it has one
    piece per row of the model's token table."""
    vocab = os.path.join(hf_dir, 'vocab.txt')
    if not os.path.isfile(vocab):
        return None
    from tokenizer import Tokenizer, bert_vocab_model

    data = bert_vocab_model(vocab)
    pieces = Tokenizer.from_bytes(data).vocab_size
    if pieces != vocab_size:
        raise ValueError(
            f"{vocab} has {pieces} pieces, but config.json's vocab_size (the rows of the token table) is "
            f"{vocab_size}: give the vocab.txt this model was trained with"
        )
    return data


def import_hf(hf_dir, out_dir, overwrite=False):
    """GPT-2 folder -> out_dir/best.pt (+ tokenizer.model). Returns the model."""
    refuse_previous_run(out_dir, overwrite, resumable=False)  # before the reading; again once out_dir is held
    hf_config, config_path = read_hf_config(hf_dir)
    model_args = model_args_from_config(hf_config, config_path)
    weights = read_hf_weights(hf_dir)
    with torch.device('meta'):  # shapes only: a config's n_positions of millions allocates nothing before the check
        shapes = GPT(GPTConfig(**model_args))
    state = state_from_hf(weights, shapes, hf_dir)
    tokenizer_model = read_vocab(hf_dir, model_args['vocab_size'])
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(state)
    # everything is checked: only now is out_dir held, and a previous run's files (--overwrite) cleared
    with claim_out_dir(out_dir):
        start_fresh(out_dir, overwrite, resumable=False)
        tokenizer_path = os.path.join(out_dir, 'tokenizer.model')
        if tokenizer_model is not None:
            from prepare.sources import atomic_write

            atomic_write(tokenizer_path, tokenizer_model)
        elif os.path.isfile(tokenizer_path):  # the replaced run's: it does not go with these weights
            os.remove(tokenizer_path)
        save_checkpoint(
            dict(
                model=model.state_dict(),
                model_args=model_args,
                config=dict(hf_dir=os.path.abspath(hf_dir), converted_by='convert.py'),
                tokenizer=tokenizer_record(tokenizer_path) if tokenizer_model else None,
            ),
            os.path.join(out_dir, 'best.pt'),
        )
    return model


# ----------------------------------------------------------------------------- export


def hf_state(model, drop_extras=False):
    """GPT2LMHeadModel's tensors for our model: Conv1D layout, zeros for the biases a bias=False model lacks."""
    present = [what for attr, what in EXTRAS.items() if getattr(model, attr) is not None]
    if present and not drop_extras:
        raise ValueError(
            f"the model has {', '.join(present)}: GPT-2 has no such input or output, so "
            f"transformers could not use it; --drop_extras exports the model without"
        )
    state = {}
    for name, tensor in model.state_dict().items():
        if name == 'lm_head.weight' or name.split('.')[0] in EXTRAS:
            continue  # tied to wte (transformers re-ties it), or an extra being dropped
        state[hf_name(name)] = (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
    if not model.config.bias:
        for name, tensor in list(state.items()):
            if name.endswith('.weight') and ('.ln_' in name or 'c_' in name):
                out_features = tensor.shape[-1] if is_conv1d(name) else tensor.shape[0]
                state[name[: -len('weight')] + 'bias'] = torch.zeros(out_features, dtype=tensor.dtype)
    return state


def hf_config(model_args, tokenizer):
    return {
        'architectures': ['GPT2LMHeadModel'],
        'model_type': 'gpt2',
        'vocab_size': model_args['vocab_size'],
        'n_positions': model_args['block_size'],
        'n_embd': model_args['n_embd'],
        'n_layer': model_args['n_layer'],
        'n_head': model_args['n_head'],
        'n_inner': None,
        'activation_function': EXPORTED_ACTIVATION[model_args.get('activation', 'gelu')],
        'resid_pdrop': model_args['dropout'],
        'embd_pdrop': model_args['dropout'],
        'attn_pdrop': model_args['dropout'],
        'layer_norm_epsilon': 1e-5,
        'initializer_range': 0.02,
        'scale_attn_weights': True,
        'tie_word_embeddings': True,
        'use_cache': True,
        'bos_token_id': tokenizer.bos_id if tokenizer and tokenizer.bos_id is not None else None,
        'eos_token_id': tokenizer.eot_id if tokenizer else None,
    }


def checkpoint_tokenizer(out_dir, checkpoint, given):
    """(the tokenizer.model bytes to ship, where they come from): the tokenizer the checkpoint carries; for a
    checkpoint without one, `given` or out_dir's tokenizer.model, refused unless it has one piece per row of
    the token table; (None, None) when there is none of these."""
    vocab_size = checkpoint['model_args']['vocab_size']
    if checkpoint.get('tokenizer'):
        record = checkpoint['tokenizer']
        if given and tokenizer_record(given)['sha256'] != record['sha256']:
            raise ValueError(
                f"the checkpoint in {out_dir} carries the tokenizer it was trained with "
                f"(sha256 {record['sha256'][:12]}), and {given} is another: leave --tokenizer out"
            )
        return record['data'], 'the checkpoint'
    path = given or os.path.join(out_dir, 'tokenizer.model')
    if not os.path.isfile(path):
        if given:
            raise FileNotFoundError(f"no tokenizer at --tokenizer={given}")
        return None, None
    from tokenizer import Tokenizer

    with open(path, 'rb') as f:
        data = f.read()
    if Tokenizer.from_bytes(data).vocab_size != vocab_size:
        raise ValueError(
            f"{path} has {Tokenizer.from_bytes(data).vocab_size} pieces, the model {vocab_size} rows "
            f"in its token table: give --tokenizer=<the tokenizer.model it was trained with>"
        )
    return data, path


def export_hf(out_dir, hf_dir, drop_extras=False, tokenizer_path='', overwrite=False):
    """Checkpoint folder -> Hugging Face folder (config.json, model.safetensors, tokenizer), written whole under
    a temporary name and renamed into place."""
    from safetensors.torch import save_file

    from prepare.dataset import atomic_dir
    from tokenizer import Tokenizer

    held = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
    if held and not overwrite:
        raise ValueError(
            f"{hf_dir} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): give "
            f"another --hf_dir, or pass --overwrite to replace the model in it"
        )
    model, checkpoint = load_model(out_dir)
    state = hf_state(model, drop_extras)
    tokenizer_bytes, tokenizer_source = checkpoint_tokenizer(out_dir, checkpoint, tokenizer_path)
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes) if tokenizer_bytes else None
    with atomic_dir(hf_dir, kind_file='config.json', option='--hf_dir') as folder:
        save_file(state, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
        with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
            json.dump(hf_config(dict(vars(model.config)), tokenizer), f, indent=2)
        if tokenizer is None:
            print(f"{out_dir}'s checkpoint carries no tokenizer: give --tokenizer=PATH to ship one")
        elif tokenizer.kind == 'bert':
            with open(os.path.join(folder, 'vocab.txt'), 'w', encoding='utf-8') as f:
                f.write(''.join(p + '\n' for p in tokenizer.pieces))
            with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
                json.dump(
                    {
                        'tokenizer_class': 'BertTokenizer',
                        'do_lower_case': True,
                        'model_max_length': model.config.block_size,
                    },
                    f,
                    indent=2,
                )
        else:
            with open(os.path.join(folder, 'tokenizer.model'), 'wb') as f:
                f.write(tokenizer_bytes)
            with open(os.path.join(folder, 'TOKENIZER.md'), 'w', encoding='utf-8') as f:
                f.write(
                    f"tokenizer.model is CMed-GPT's own {tokenizer.kind} tokenizer, which transformers has no "
                    f"class for. Load it with the project:\n\n    from tokenizer import Tokenizer\n"
                    f"    tok = Tokenizer.load('tokenizer.model')\n"
                    f"    ids = tok.encode(text); text = tok.decode(ids)\n"
                )
    if tokenizer is not None:
        print(f"shipped the tokenizer of {tokenizer_source} ({tokenizer.kind}, {tokenizer.vocab_size} pieces)")
    return state


def main(argv=None):
    cfg = configure(DEFAULTS, argv)
    if not cfg['hf_dir'] or not cfg['out_dir']:
        raise SystemExit("give both --hf_dir and --out_dir (see the top of convert.py)")
    try:
        if cfg['export']:
            state = export_hf(cfg['out_dir'], cfg['hf_dir'], cfg['drop_extras'], cfg['tokenizer'], cfg['overwrite'])
            print(
                f"wrote {cfg['hf_dir']}: {len(state)} tensors; "
                f"GPT2LMHeadModel.from_pretrained({cfg['hf_dir']!r}) loads it"
            )
        else:
            model = import_hf(cfg['hf_dir'], cfg['out_dir'], cfg['overwrite'])
            print(
                f"wrote {os.path.join(cfg['out_dir'], 'best.pt')}: {model.num_params():,} parameters, "
                f"{model.config.n_layer} layers, block {model.config.block_size}, {model.config.activation}"
            )
    except (OSError, ValueError, KeyError, DataError) as error:  # (a full disk too: hf_dir's temporary is gone)
        raise SystemExit(f"convert.py: {error}") from None


if __name__ == '__main__':
    main()
