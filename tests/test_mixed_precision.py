"""The GPU path run on a CPU: train.py in bfloat16 autocast, in float16 with the gradient scaler (which must skip
an overflowing step), compiled with torch.compile, and as two torchrun ranks in bfloat16. Each learns, and a run
stopped halfway then resumed ends exactly where the uninterrupted run ends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from model import GPT  # noqa: E402
from test_train import data_dir, read_log, tiny_args, train_losses  # noqa: E402,F401 (data_dir is a fixture)


def val_losses(records):
    """iter -> validation loss; a resumed run's later lines win over an earlier run's."""
    return {r['iter']: r['val_loss'] for r in records if 'val_loss' in r}


def assert_learns(records):
    losses = val_losses(records)
    assert losses[max(losses)] < losses[0] - 0.3


def assert_same_weights(a, b):
    a, b = load_checkpoint(a)['model'], load_checkpoint(b)['model']
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def whole_and_resumed(data_dir, tmp_path, run, **overrides):
    """Train max_iters (tiny_args' 8) in one go into tmp_path/whole, and into tmp_path/split in two halves: stopped
    at the half (an evaluation, so a checkpoint) and resumed. run(args) trains."""
    half = int(overrides.get('max_iters', 8)) // 2
    run(tiny_args(data_dir, tmp_path / 'whole', **overrides))
    run(tiny_args(data_dir, tmp_path / 'split', **{**overrides, 'max_iters': half}))
    run(tiny_args(data_dir, tmp_path / 'split', init_from='resume', **overrides))
    return tmp_path / 'whole', tmp_path / 'split'


def test_bfloat16_autocast_learns_and_resumes_exactly(data_dir, tmp_path):
    whole, split = whole_and_resumed(data_dir, tmp_path, train.main, dtype='bfloat16')
    assert_learns(read_log(whole))
    assert train_losses(read_log(split)) == train_losses(read_log(whole))  # bit for bit
    assert val_losses(read_log(split)) == val_losses(read_log(whole))
    assert_same_weights(split / 'ckpt.pt', whole / 'ckpt.pt')


def gpt_overflowing_at(iteration, accum_steps, weights_before_each_step):
    """A GPT whose backward overflows float16 in one iteration (counted from the run's first step), and which
    keeps a copy of its weights as each iteration starts. The loss's gradient there is 1e30 times larger: finite
    in float32, but past float16's largest number (65,504) once the backward reaches the autocast matmuls."""
    train_calls = 0

    class OverflowingGPT(GPT):
        def forward(self, *args, **kwargs):
            nonlocal train_calls
            logits, loss = super().forward(*args, **kwargs)
            if self.training and torch.is_grad_enabled():  # a training micro-step, not an evaluation
                step, micro_step = divmod(train_calls, accum_steps)
                if micro_step == 0:
                    weights_before_each_step.append({k: v.clone() for k, v in self.state_dict().items()})
                if step == iteration:
                    loss.register_hook(lambda grad: grad * 1e30)
                train_calls += 1
            return logits, loss

    return OverflowingGPT


def test_float16_gradient_scaler_skips_an_overflowing_step_learns_and_resumes_exactly(
    data_dir, tmp_path, monkeypatch, capsys
):
    runs = []  # per run: the weights as each of its iterations started

    def run_overflowing_at_iter_2(args):
        runs.append([])
        start = 4 if '--init_from=resume' in args else 0
        monkeypatch.setattr(train, 'GPT', gpt_overflowing_at(2 - start, 2, runs[-1]))
        train.main(args)

    whole, split = whole_and_resumed(
        data_dir, tmp_path, run_overflowing_at_iter_2, dtype='float16', gradient_accumulation_steps=2
    )
    records = read_log(whole)
    assert [r['iter'] for r in records if r.get('skipped_step')] == [2]  # that step, and no other
    assert 'fp16 overflow: step skipped, scale now 32768' in capsys.readouterr().out
    weights = runs[0]
    assert len(weights) == 8
    for step in range(7):  # the weights after a step are the next step's starting weights
        unchanged = all(torch.equal(weights[step][k], weights[step + 1][k]) for k in weights[step])
        assert unchanged == (step == 2), step
    assert_learns(records)
    scaler = load_checkpoint(whole / 'ckpt.pt')['scaler']
    assert scaler['scale'] == 65536.0 / 2  # halved once, never grown back (growth_interval is 2,000 steps)
    # the resumed half continues from the halved scale the checkpoint holds, not from a fresh scaler's
    assert load_checkpoint(split / 'ckpt.pt')['scaler'] == scaler
    assert [r['iter'] for r in read_log(split) if r.get('skipped_step')] == [2]
    assert train_losses(read_log(split)) == train_losses(records)
    assert val_losses(read_log(split)) == val_losses(records)
    assert_same_weights(split / 'ckpt.pt', whole / 'ckpt.pt')


def test_float16_on_a_cpu_is_allowed_and_says_why(data_dir, tmp_path, capsys):
    train.main(tiny_args(data_dir, tmp_path, dtype='float16', max_iters=0))
    assert "in float16 (asked for; float16 on a CPU runs the GPU's gradient-scaler path" in capsys.readouterr().out


def cpp_compiler_missing():
    """Why torch.compile cannot build CPU kernels here ('' when it can): inductor needs a C++ compiler."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # its own error type differs between versions
        return f"torch._inductor finds no C++ compiler ({error})"
    return ''


@pytest.mark.filterwarnings('ignore:`torch.jit.script_method` is deprecated')  # torch's own, while compiling
def test_compiled_training_matches_the_uncompiled_run_and_resumes(data_dir, tmp_path):
    if cpp_compiler_missing():
        pytest.skip(cpp_compiler_missing())
    # the smallest run that compiles the training step, its backward and the evaluation: 4 steps, 1 layer
    small = dict(max_iters=4, eval_interval=2, eval_iters=1, dropout=0.0, lexical=False, entity=False)
    small.update(warmup_iters=1, lr_decay_iters=4, dtype='float32')
    torch._dynamo.reset()
    try:
        train.main(tiny_args(data_dir, tmp_path / 'eager', **small))
        assert counters['frames']['ok'] == 0
        whole, split = whole_and_resumed(data_dir, tmp_path, train.main, compile=True, **small)
        assert counters['frames']['ok'] > 0 and counters['stats']['unique_graphs'] > 0  # dynamo did compile
    finally:
        torch._dynamo.reset()  # leave no compiled code behind for the other tests
    eager, compiled = train_losses(read_log(tmp_path / 'eager')), train_losses(read_log(whole))
    assert compiled == pytest.approx(eager, rel=1e-4)  # the same arithmetic, fused into other kernels
    assert val_losses(read_log(whole))[4] < val_losses(read_log(whole))[0] - 0.1
    assert train_losses(read_log(split)) == pytest.approx(compiled, rel=1e-6)
    assert val_losses(read_log(split)) == pytest.approx(val_losses(read_log(whole)), rel=1e-6)


def test_two_torchrun_ranks_in_bfloat16_learn_stay_in_step_and_resume_exactly(data_dir, tmp_path):
    def torchrun(args):
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
        result = subprocess.run(
            [*command, str(ROOT / 'train.py'), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, 'OMP_NUM_THREADS': '1'},
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert 'in bfloat16 (asked for)' in result.stdout

    whole, split = whole_and_resumed(data_dir, tmp_path, torchrun, dtype='bfloat16', gradient_accumulation_steps=4)
    for out in (whole, split):
        checksums = [r['param_checksums'] for r in read_log(out) if 'param_checksums' in r]
        assert all(len(c) == 2 and c[0] == c[1] for c in checksums) and len(checksums) == (1 if out == whole else 2)
    assert_learns(read_log(whole))
    assert train_losses(read_log(split)) == train_losses(read_log(whole))
    assert val_losses(read_log(split)) == val_losses(read_log(whole))
    assert_same_weights(split / 'ckpt.pt', whole / 'ckpt.pt')
