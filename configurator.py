"""
One small config mechanism for every script (train, finetune, sample, bench, reproduce).

    config = configure(DEFAULTS)            # reads sys.argv[1:]

Order of precedence, last wins:
  1. the script's defaults (a dict),
  2. an optional config file given first on the command line: plain Python whose top-level names
     override the defaults, e.g. `python train.py config/tiny.py`,
  3. command-line overrides: `--key=value`, `--key value`, or a bare `--flag` for a boolean.
Every value given as text is converted to the type of its default, so `--max_iters=100` is an int
and `--compile` is True. A key that no default has is an error naming the closest known key:
typos must not silently train with the wrong setting.
"""

import ast
import difflib
import os
import sys
import types

TRUE_WORDS = {'true', '1', 'yes', 'on'}
FALSE_WORDS = {'false', '0', 'no', 'off'}


def configure(defaults, argv=None, file_keys_elsewhere=False):
    """Return a new dict: defaults, then the config file, then the overrides. Prints the result.
    file_keys_elsewhere: the config file may hold keys for another script (bench.py reads train.py's
    config files); those are listed and ignored instead of refused."""
    config = dict(defaults)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ('-h', '--help'):
        print(usage(defaults))
        raise SystemExit(0)
    if args and not args[0].startswith('-'):
        config.update(read_config_file(args.pop(0), config, file_keys_elsewhere))
    for key, text in split_overrides(args, defaults):
        # typed from the script's default, not the config file's value: `learning_rate = 1` in a
        # file must not make `--learning_rate=3e-4` an int
        config[key] = convert(key, text, defaults[key])
    print_config(config)
    return config


def given_keys(defaults, argv=None):
    """The keys the config file or the command line set, whatever the value (the default's own included):
    what the user asked for, as configure reads it."""
    args = list(sys.argv[1:] if argv is None else argv)
    keys = set()
    if args and not args[0].startswith('-'):
        keys |= set(config_file_values(args.pop(0)))
    return keys | {key for key, _ in split_overrides(args, defaults)}


def config_file_values(path):
    """Execute a config file and return its top-level names (modules and _private names skipped)."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file not found: {path}")
    namespace = {'__file__': path}
    with open(path, encoding='utf-8') as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    return {
        key: value
        for key, value in namespace.items()
        if not key.startswith('_') and not isinstance(value, types.ModuleType)
    }


def read_config_file(path, config, file_keys_elsewhere=False):
    """The config file's values, each checked against the script's keys."""
    overrides = config_file_values(path)
    if file_keys_elsewhere:
        ignored = sorted(key for key in overrides if key not in config)
        if ignored:
            print(f"{path}: ignoring keys this script does not use: {', '.join(ignored)}")
        return {key: value for key, value in overrides.items() if key in config}
    for key in overrides:
        check_known(key, config, where=path)
    return overrides


def split_overrides(args, config):
    """Yield (key, text) pairs; text is None for a bare boolean flag."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith('--'):
            raise SystemExit(
                f"unexpected argument {arg!r}: overrides look like --key=value (a config file may only come first)"
            )
        key, has_value, text = arg[2:].partition('=')
        check_known(key, config, where='the command line')
        i += 1
        if not has_value:
            text, i = value_after_flag(key, args, i, config)
        yield key, text


def value_after_flag(key, args, i, config):
    """`--key value` takes the next argument; a boolean `--flag` takes it only if it is true/false."""
    following = args[i] if i < len(args) else None
    if isinstance(config[key], bool):
        if following is not None and following.lower() in TRUE_WORDS | FALSE_WORDS:
            return following, i + 1
        return None, i
    if following is None or following.startswith('--'):
        raise SystemExit(f"--{key} needs a value, e.g. --{key}={config[key]!r}")
    return following, i + 1


def check_known(key, config, where):
    if key not in config:
        closest = difflib.get_close_matches(key, list(config), n=1, cutoff=0.0)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        raise SystemExit(f"unknown config key {key!r} in {where}{hint}")


def convert(key, text, default):
    """Turn the command-line text into a value of the default's type."""
    if text is None:
        return True  # a bare flag; value_after_flag only allows it for booleans
    try:
        if isinstance(default, bool):  # before int: bool is a subclass of int
            return parse_bool(text)
        if isinstance(default, (int, float, str)):
            return type(default)(text)
        value = parse_literal(text)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(f"expected a {type(default).__name__}")
        return value
    except ValueError as error:
        raise SystemExit(f"bad value for --{key}: {text!r} ({error}); default is {default!r}")


def parse_bool(text):
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError("expected true or false")


def parse_literal(text):
    """For None (or list, tuple...) defaults: a Python literal if it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def print_config(config):
    # under torchrun every rank configures itself; only rank 0 prints, like every other log line
    if int(os.environ.get('RANK', 0)) == 0:
        width = max(map(len, config), default=0)
        # a secret (serve.py's api_key) is not shown: logs of the start-up are read by others
        shown = {key: '<set>' if key.endswith('api_key') and value else value for key, value in config.items()}
        print('\n'.join(f"{key:<{width}} = {value!r}" for key, value in shown.items()))


def usage(defaults):
    lines = ["usage: [config_file.py] [--key=value | --key value | --flag] ...", "keys and defaults:"]
    return '\n'.join(lines + [f"  --{key}={value!r}" for key, value in defaults.items()])
