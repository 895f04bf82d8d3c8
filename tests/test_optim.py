"""optim.py: Muon's update is near-orthogonal, the parameter groups follow the rules (hidden matrices to Muon,
frozen tensors to nobody), its AdamW half is torch's AdamW, its state resumes exactly; and the schedules."""

import copy

import pytest
import torch

import common
from model import GPT, GPTConfig
from optim import MuonAdamW, configure_optimizers, orthogonalize


def small_model(**extra):
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, n_lexical=4, n_entity=2, **extra)
    )


def test_orthogonalize_gives_near_orthogonal_matrices():
    torch.manual_seed(0)
    # singular values spread over two orders of magnitude, tall and wide and square
    for rows, cols in ((96, 32), (32, 96), (48, 48)):
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k))
        V, _ = torch.linalg.qr(torch.randn(cols, k))
        S = torch.logspace(0, -2, k)
        X = orthogonalize(U @ torch.diag(S) @ V.T)
        singular = torch.linalg.svdvals(X)
        assert singular.min() > 0.5 and singular.max() < 1.25, (rows, cols, singular.min(), singular.max())
        # the singular vectors are kept: U^T X V is diagonal
        inner = U.T @ X @ V
        off_diagonal = inner - torch.diag(torch.diagonal(inner))
        assert off_diagonal.norm() < 1e-3 * inner.norm()


def test_muon_step_on_a_matrix_is_near_orthogonal():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 32))
    optimizer = MuonAdamW([{'params': [w], 'use_muon': True}], lr=0.1)
    before = w.detach().clone()
    w.grad = torch.randn(96, 32) @ torch.diag(torch.logspace(0, -1, 32))  # an ill-conditioned gradient
    optimizer.step()
    singular = torch.linalg.svdvals(w.detach() - before)
    assert singular.max() / singular.min() < 2.0  # every direction moves by about the same amount
    # the step's size: lr times sqrt(rows / cols) per singular direction (tall matrices scaled up)
    assert 0.5 * 0.1 * 3**0.5 < singular.mean() < 1.25 * 0.1 * 3**0.5


def test_groups_hidden_matrices_to_muon_the_rest_to_adamw():
    model = small_model(n_classes=3)
    optimizer = configure_optimizers(model, 'muon', 0.1, 1e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g['use_muon'] for p in g['params']}
    adamw = {names[id(p)] for g in optimizer.param_groups if not g['use_muon'] for p in g['params']}
    assert muon == {name for name, p in model.named_parameters() if name.startswith('blocks.') and p.dim() == 2}
    assert {'wte.weight', 'wpe.weight', 'wle.weight', 'wee.weight', 'ln_f.weight', 'class_head.weight'} <= adamw
    assert not muon & adamw and len(muon | adamw) == len(list(model.parameters()))
    # the schedule sets lr = learning_rate(it) * lr_scale: Muon's groups peak at muon_lr
    assert {g['lr_scale'] for g in optimizer.param_groups if g['use_muon']} == {0.02 / 1e-3}
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        configure_optimizers(model, 'sgd', 0.1, 1e-3, (0.9, 0.95), 'cpu')


@pytest.mark.parametrize('optimizer_name', ['adamw', 'muon'])
def test_ptuning_trains_only_the_prompt(optimizer_name):
    model = small_model(n_prompt=3)
    model.freeze_for_ptuning(train_entity=True)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = configure_optimizers(model, optimizer_name, 0.1, 1e-2, (0.9, 0.95), 'cpu')
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    idx = torch.randint(0, 50, (2, 8))
    prompt_before = model.prompt.embedding.detach().clone()
    for _ in range(2):
        _, loss = model(idx, targets=idx, entity=torch.ones_like(idx))
        loss.backward()
        common.optimizer_step(optimizer, torch.amp.GradScaler('cpu', enabled=False), model.parameters(), 1.0, 1e-2)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(model.prompt.embedding, prompt_before)


def test_adamw_half_is_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = MuonAdamW([{'params': params, 'use_muon': False, 'weight_decay': 0.1}], lr=1e-2, betas=(0.9, 0.99))
    torch_adamw = torch.optim.AdamW(twins, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, twin, grad in zip(params, twins, grads):
            p.grad, twin.grad = grad, grad.clone()
        ours.step()
        torch_adamw.step()
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin)


def test_state_dict_resumes_exactly():
    model = small_model()
    optimizer = configure_optimizers(model, 'muon', 0.1, 1e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))

    def step(m, opt):
        _, loss = m(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(model, optimizer)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    step(model, optimizer)
    resumed = small_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = configure_optimizers(resumed, 'muon', 0.1, 1e-3, (0.9, 0.95), 'cpu')
    resumed_optimizer.load_state_dict(saved_optimizer)
    step(resumed, resumed_optimizer)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_muon_learns_faster_than_its_start():
    """A few steps of Muon lower the loss on a batch it sees repeatedly (the update has the right sign)."""
    model = small_model()
    optimizer = configure_optimizers(model, 'muon', 0.0, 3e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(20):
        _, loss = model(idx, targets=idx)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0]


def test_wsd_schedule():
    lr = [common.learning_rate_at(it, 1.0, 0.1, 10, 110, schedule='wsd', warmdown_fraction=0.2) for it in range(120)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)  # the same warm-up as cosine
    assert all(v == 1.0 for v in lr[10:91])  # stable: the full rate until the last 20% (80 of 100)
    assert lr[100] == pytest.approx(1.0 - 0.5 * 0.9)  # halfway down the straight line
    assert all(a > b for a, b in zip(lr[90:110], lr[91:111]))
    assert lr[110:] == [0.1] * 10
    cosine = [common.learning_rate_at(it, 1.0, 0.1, 10, 110) for it in range(120)]
    assert cosine[60] == pytest.approx(0.55) and cosine[10] == 1.0
