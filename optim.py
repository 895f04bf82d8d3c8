"""
The optimisers: AdamW (the papers' and nanoGPT's), or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz") keeps SGD momentum for each 2-D
weight matrix of the transformer blocks, and replaces the momentum M = U S V^T by the nearest orthogonal
matrix U V^T before stepping. Every direction of the update then moves by the same amount, where plain
momentum is dominated by a few large singular directions. U V^T is approximated with five Newton-Schulz
iterations, matmuls only, so it costs little next to the forward and backward passes.

Embedding tables (token, position, lexical, entity; the token table is also the tied LM head), the soft
prompt, LayerNorm gains, biases and a classification head are not hidden matrices: AdamW updates them.

    optimizer = configure_optimizers(model, 'muon', weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.99),
                                     device_type='cpu', muon_lr=0.02)
"""

import inspect

import torch

# Not hidden matrices although 2-D: they are read by lookup (or, tied, write the logits), never multiplied
# by a hidden state the way the blocks' weights are. named_parameters lists a tied matrix under wte.weight.
TABLES = ('wte.weight', 'wpe.weight', 'wle.weight', 'wee.weight', 'prompt.embedding')


def configure_optimizers(
    model, optimizer, weight_decay, learning_rate, betas, device_type, muon_lr=0.02, muon_momentum=0.95
):
    """The optimiser over the model's trainable parameters (frozen ones are left out, so p-tuning stays
    p-tuning). 'adamw': weight decay only on the 2-D matrices of linear maps. 'muon': Muon for the blocks'
    2-D matrices at muon_lr, AdamW for everything else at learning_rate.

    Each group carries lr_scale, its peak over learning_rate: the schedule sets lr = schedule * lr_scale."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matrices = [p for name, p in trainable if p.dim() >= 2 and name not in TABLES]
    others = [p for name, p in trainable if p.dim() < 2 or name in TABLES]
    if optimizer == 'adamw':
        groups = [
            {'params': matrices, 'weight_decay': weight_decay, 'lr_scale': 1.0},
            {'params': others, 'weight_decay': 0.0, 'lr_scale': 1.0},
        ]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))
    if optimizer != 'muon':
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
    # a classification head's (n_classes, C) matrix maps to classes, not to the hidden stream: AdamW
    head = {id(p) for name, p in trainable if name.startswith('class_head.')}
    groups = [
        {
            'params': [p for p in matrices if id(p) not in head],
            'use_muon': True,
            'weight_decay': weight_decay,
            'lr_scale': muon_lr / learning_rate,
        },
        {
            'params': [p for p in matrices if id(p) in head],
            'use_muon': False,
            'weight_decay': weight_decay,
            'lr_scale': 1.0,
        },
        {'params': others, 'use_muon': False, 'weight_decay': 0.0, 'lr_scale': 1.0},
    ]
    return MuonAdamW([g for g in groups if g['params']], lr=learning_rate, betas=betas, momentum=muon_momentum)


def orthogonalize(G, steps=5):
    """An approximation of U V^T for G = U S V^T (G is 2-D), by a quintic Newton-Schulz iteration.

    Each step maps every singular value s of X to a*s + b*s^3 + c*s^5 and leaves U and V alone. The
    coefficients (Jordan et al.) push every s in (0, 1] quickly towards 1 without converging exactly:
    they end between about 0.7 and 1.2, which trains as well as exact U V^T at a fraction of an SVD's cost."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:  # work on the wide orientation: X @ X.T is then the smaller square
        X = X.T
    X = X / (X.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value: all s now <= 1
    for _ in range(steps):
        A = X @ X.T  # (rows, rows)
        B = b * A + c * A @ A
        X = a * X + B @ X  # = (a I + b XX^T + c (XX^T)^2) X: odd polynomial in the singular values
    return (X.T if transposed else X).to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with use_muon, AdamW on the others, in one optimiser: one state_dict for the
    checkpoint, one object for the gradient scaler and the schedule."""

    def __init__(self, param_groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            momentum=momentum,
            ns_steps=ns_steps,
            weight_decay=0.0,
            use_muon=False,
            lr_scale=1.0,
        )
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, weight_decay = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * weight_decay)  # decoupled weight decay, as AdamW's
                if group['use_muon']:
                    self._muon_update(p, state, group)
                else:
                    self._adamw_update(p, state, group)

    @staticmethod
    def _muon_update(p, state, group):
        if 'momentum_buffer' not in state:
            state['momentum_buffer'] = torch.zeros_like(p)
        buf, momentum = state['momentum_buffer'], group['momentum']
        buf.mul_(momentum).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=momentum)  # look one momentum step ahead
        update = orthogonalize(nesterov, group['ns_steps'])
        # an orthogonal (rows, cols) matrix has entries of size ~1/sqrt(max(rows, cols)); this makes the step's
        # size per output independent of the matrix's shape (tall MLP and square attention matrices alike)
        p.add_(update, alpha=-group['lr'] * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    @staticmethod
    def _adamw_update(p, state, group):
        if 'step' not in state:
            state['step'] = torch.zeros((), dtype=torch.float32)
            state['exp_avg'] = torch.zeros_like(p)
            state['exp_avg_sq'] = torch.zeros_like(p)
        beta1, beta2 = group['betas']
        state['step'] += 1
        step = state['step'].item()
        state['exp_avg'].lerp_(p.grad, 1 - beta1)  # m = b1 m + (1 - b1) g
        state['exp_avg_sq'].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
        # bias correction: m and v start at zero, so early on they underestimate; divide by (1 - b^step)
        denominator = (state['exp_avg_sq'] / (1 - beta2**step)).sqrt_().add_(group['eps'])
        p.addcdiv_(state['exp_avg'], denominator, value=-group['lr'] / (1 - beta1**step))
