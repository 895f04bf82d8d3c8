"""
Hugging Face GPT-2 folders in and out: start from GPT2-Chinese, hand models to transformers.

Import (a GPT2LMHeadModel folder: config.json, model.safetensors or pytorch_model.bin, vocab.txt):
    python convert.py --hf_dir=gpt2-distil-chinese --out_dir=out/gpt2_chinese
writes out_dir/best.pt (a normal checkpoint: train.py --init_from, finetune.py and sample.py read it) and, when
the folder has a vocab.txt, out_dir/tokenizer.model (the BERT vocabulary, see tokenizer.py).

Export (a checkpoint folder to a folder that GPT2LMHeadModel.from_pretrained loads):
    python convert.py --export --out_dir=out/base --hf_dir=hf/base
writes config.json, model.safetensors and the tokenizer: vocab.txt for a BERT-vocabulary model (BertTokenizer
loads it), else the project's own tokenizer.model with a note. GPT-2 has no lexical/entity tables, soft prompt
or class head: a model with one is refused unless --drop_extras, which leaves them out.

Hugging Face's Conv1D stores a linear map as (in, out), nn.Linear as (out, in): those matrices are transposed.
"""
import json
import os
import pickle
import shutil

import torch

from checkpoint import load_model, load_weights_only, save_checkpoint
from configurator import configure
from model import GPT, GPTConfig

DEFAULTS = dict(
    hf_dir='',            # the Hugging Face folder: read on import, written on export
    out_dir='',           # the checkpoint folder: written on import, read on export
    export=False,         # False: Hugging Face -> checkpoint; True: checkpoint -> Hugging Face
    drop_extras=False,    # export: leave out lexical/entity tables, soft prompt and class head
    tokenizer='',         # export: tokenizer.model to ship ('' = out_dir's, else the training data folder's)
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
        return 'transformer.h.' + name[len('blocks.'):]
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
    need('activation_function', hf_config.get('activation_function', 'gelu_new') in ACTIVATIONS,
         'one of ' + ', '.join(ACTIVATIONS))
    need('layer_norm_epsilon', hf_config.get('layer_norm_epsilon', 1e-5) == 1e-5, '1e-5, torch LayerNorm\'s eps')
    need('scale_attn_weights', hf_config.get('scale_attn_weights', True), 'scores scaled by 1/sqrt(head size)')
    for key in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn', 'add_cross_attention'):
        need(key, not hf_config.get(key, False), 'it off')
    need('tie_word_embeddings', hf_config.get('tie_word_embeddings', True), 'the LM head tied to the token table')
    need('n_head', n_embd % n_head == 0, 'n_embd divisible by n_head')
    return dict(block_size=hf_config['n_positions'], vocab_size=hf_config['vocab_size'],
                n_layer=hf_config['n_layer'], n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True,
                n_lexical=0, n_entity=0, attention='fused',
                activation=ACTIVATIONS[hf_config.get('activation_function', 'gelu_new')])


def read_hf_weights(hf_dir):
    """{name: tensor} from model.safetensors, else from pytorch_model.bin unpickled with weights_only=True."""
    path = os.path.join(hf_dir, 'model.safetensors')
    if os.path.isfile(path):
        from safetensors.torch import load_file
        return load_file(path)
    path = os.path.join(hf_dir, 'pytorch_model.bin')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {hf_dir}")
    try:
        weights = load_weights_only(path)
    except pickle.UnpicklingError as error:  # weights_only refused something: it never ran
        reason = str(error).split('\n')[0]
        raise ValueError(f"{path}: refused, the pickle holds more than tensors and could run code ({reason}); "
                         f"get a model.safetensors for this model instead") from None
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
            raise ValueError(f"{path}: {key} has shape {tuple(weights[key].shape)}, the config needs "
                             f"{tuple(ours.t().shape if is_conv1d(name) else ours.shape)}")
        state[name] = tensor.to(torch.float32).contiguous()
        used.add(key)
    state['lm_head.weight'] = state['wte.weight']
    if 'lm_head.weight' in weights:
        used.add('lm_head.weight')
        if not torch.equal(weights['lm_head.weight'].to(torch.float32), state['wte.weight']):
            raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight; this model ties them")
    unexpected = sorted(k for k in weights if k not in used and not k.endswith(BUFFERS))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)"
                                                                          if len(unexpected) > 1 else ''))
    return state


def import_hf(hf_dir, out_dir):
    """GPT-2 folder -> out_dir/best.pt (+ tokenizer.model). Returns the model."""
    config_path = os.path.join(hf_dir, 'config.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {hf_dir}: give --hf_dir a Hugging Face GPT-2 folder")
    with open(config_path, encoding='utf-8') as f:
        model_args = model_args_from_config(json.load(f), config_path)
    weights = read_hf_weights(hf_dir)
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(state_from_hf(weights, model, hf_dir))
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(dict(model=model.state_dict(), model_args=model_args,
                         config=dict(hf_dir=os.path.abspath(hf_dir), converted_by='convert.py')),
                    os.path.join(out_dir, 'best.pt'))
    vocab = os.path.join(hf_dir, 'vocab.txt')
    if os.path.isfile(vocab):
        from tokenizer import import_bert_vocab
        import_bert_vocab(vocab, os.path.join(out_dir, 'tokenizer.model'))
    return model


# ----------------------------------------------------------------------------- export

def hf_state(model, drop_extras=False):
    """GPT2LMHeadModel's tensors for our model: Conv1D layout, zeros for the biases a bias=False model lacks."""
    present = [what for attr, what in EXTRAS.items() if getattr(model, attr) is not None]
    if present and not drop_extras:
        raise ValueError(f"the model has {', '.join(present)}: GPT-2 has no such input or output, so "
                         f"transformers could not use it; --drop_extras exports the model without")
    state = {}
    for name, tensor in model.state_dict().items():
        if name == 'lm_head.weight' or name.split('.')[0] in EXTRAS:
            continue  # tied to wte (transformers re-ties it), or an extra being dropped
        state[hf_name(name)] = (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
    if not model.config.bias:
        for name, tensor in list(state.items()):
            if name.endswith('.weight') and ('.ln_' in name or 'c_' in name):
                out_features = tensor.shape[-1] if is_conv1d(name) else tensor.shape[0]
                state[name[:-len('weight')] + 'bias'] = torch.zeros(out_features, dtype=tensor.dtype)
    return state


def hf_config(model_args, tokenizer):
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
            'vocab_size': model_args['vocab_size'], 'n_positions': model_args['block_size'],
            'n_embd': model_args['n_embd'], 'n_layer': model_args['n_layer'], 'n_head': model_args['n_head'],
            'n_inner': None, 'activation_function': EXPORTED_ACTIVATION[model_args.get('activation', 'gelu')],
            'resid_pdrop': model_args['dropout'], 'embd_pdrop': model_args['dropout'],
            'attn_pdrop': model_args['dropout'], 'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02,
            'scale_attn_weights': True, 'tie_word_embeddings': True, 'use_cache': True,
            'bos_token_id': tokenizer.bos_id if tokenizer and tokenizer.bos_id is not None else None,
            'eos_token_id': tokenizer.eot_id if tokenizer else None}


def find_tokenizer(out_dir, config, given):
    """The tokenizer.model that goes with the checkpoint: given, out_dir's, or its training data folder's."""
    candidates = [given] if given else [os.path.join(out_dir, 'tokenizer.model'),
                                        os.path.join('data', config.get('dataset', 'pretrain'), 'tokenizer.model')]
    return next((p for p in candidates if os.path.isfile(p)), None)


def export_hf(out_dir, hf_dir, drop_extras=False, tokenizer_path=''):
    """Checkpoint folder -> Hugging Face folder (config.json, model.safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from tokenizer import Tokenizer
    model, checkpoint = load_model(out_dir)
    state = hf_state(model, drop_extras)
    tokenizer_path = find_tokenizer(out_dir, checkpoint.get('config', {}), tokenizer_path)
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path else None
    os.makedirs(hf_dir, exist_ok=True)
    save_file(state, os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(hf_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(hf_config(dict(vars(model.config)), tokenizer), f, indent=2)
    if tokenizer is None:
        print(f"no tokenizer.model found for {out_dir}: give --tokenizer=PATH to ship one")
    elif tokenizer.kind == 'bert':
        with open(os.path.join(hf_dir, 'vocab.txt'), 'w', encoding='utf-8') as f:
            f.write(''.join(p + '\n' for p in tokenizer.pieces))
        with open(os.path.join(hf_dir, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
            json.dump({'tokenizer_class': 'BertTokenizer', 'do_lower_case': True,
                       'model_max_length': model.config.block_size}, f, indent=2)
    else:
        shutil.copyfile(tokenizer_path, os.path.join(hf_dir, 'tokenizer.model'))
        with open(os.path.join(hf_dir, 'TOKENIZER.md'), 'w', encoding='utf-8') as f:
            f.write(f"tokenizer.model is CMed-GPT's own {tokenizer.kind} tokenizer, which transformers has no class "
                    f"for. Load it with the project:\n\n    from tokenizer import Tokenizer\n"
                    f"    tok = Tokenizer.load('tokenizer.model')\n    ids = tok.encode(text); text = tok.decode(ids)\n")
    return state


def main(argv=None):
    cfg = configure(DEFAULTS, argv)
    if not cfg['hf_dir'] or not cfg['out_dir']:
        raise SystemExit("give both --hf_dir and --out_dir (see the top of convert.py)")
    try:
        if cfg['export']:
            state = export_hf(cfg['out_dir'], cfg['hf_dir'], cfg['drop_extras'], cfg['tokenizer'])
            print(f"wrote {cfg['hf_dir']}: {len(state)} tensors; "
                  f"GPT2LMHeadModel.from_pretrained({cfg['hf_dir']!r}) loads it")
        else:
            model = import_hf(cfg['hf_dir'], cfg['out_dir'])
            print(f"wrote {os.path.join(cfg['out_dir'], 'best.pt')}: {model.num_params():,} parameters, "
                  f"{model.config.n_layer} layers, block {model.config.block_size}, {model.config.activation}")
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"convert.py: {error}") from None


if __name__ == '__main__':
    main()
