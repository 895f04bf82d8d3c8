"""Tests of model.py: the model's contract (the design document's "The model's contract": embedding sum, hand-written
attention, soft prompt placement, p-tuning freeze, safe loading), each able to fail."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, sample_next
from optim import configure_optimizers

V, BLOCK = 97, 32


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(block_size=BLOCK, vocab_size=V, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return GPT(GPTConfig(**args)).eval()


def random_batch(B=3, T=12, seed=1, n_lexical=4, n_entity=2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    lexical = torch.randint(0, n_lexical, (B, T), generator=g) if n_lexical else None
    entity = torch.randint(0, n_entity, (B, T), generator=g) if n_entity else None
    return idx, lexical, entity


def randomise_tag_tables(model):
    """Tag tables start at zero; give them values so that tests can see them act."""
    with torch.no_grad():
        for table in (model.wle, model.wee):
            if table is not None:
                table.weight.normal_(0.0, 0.5)


# ----- shapes, errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    'n_lexical,n_entity,n_prompt,n_classes,infix',
    [c for c in itertools.product((0, 4), (0, 2), (0, 3), (0, 5), (False, True)) if not (c[4] and c[2] == 0)],
)
def test_shapes_for_every_option(n_lexical, n_entity, n_prompt, n_classes, infix):
    model = make_model(n_lexical=n_lexical, n_entity=n_entity, n_prompt=n_prompt, n_classes=n_classes)
    B, T = 3, 10
    idx, lexical, entity = random_batch(B, T, n_lexical=n_lexical, n_entity=n_entity)
    prompt_pos = torch.tensor([0, 4, 10]) if infix else None
    logits, loss = model(idx, targets=idx, lexical=lexical, entity=entity, prompt_pos=prompt_pos)
    assert logits.shape == (B, T, V) and loss.dim() == 0 and torch.isfinite(loss)
    logits, loss = model(idx, lexical=lexical, entity=entity, prompt_pos=prompt_pos)
    assert logits.shape == (B, 1, V) and loss is None
    logits, _ = model(idx, lexical=lexical, entity=entity, prompt_pos=prompt_pos, all_logits=True)
    assert logits.shape == (B, T, V)
    h = model.encode(idx, lexical=lexical, entity=entity, prompt_pos=prompt_pos)
    assert h.shape == (B, T, 32)
    if n_classes:
        class_logits, class_loss = model.classify(h, torch.tensor([9, 3, 0]), torch.tensor([0, 4, 2]))
        assert class_logits.shape == (B, n_classes) and torch.isfinite(class_loss)


def test_tag_ids_for_a_missing_table_are_an_error():
    model = make_model()
    idx, lexical, entity = random_batch()
    with pytest.raises(ValueError, match='no lexical table'):
        model(idx, lexical=lexical)
    with pytest.raises(ValueError, match='no entity table'):
        model(idx, entity=entity)
    with pytest.raises(ValueError, match='prompt_pos'):
        model(idx, prompt_pos=torch.zeros(3, dtype=torch.long))


def test_sequence_longer_than_block_size_is_an_error():
    model = make_model(n_prompt=5)
    with pytest.raises(ValueError, match='exceeds block_size=32'):
        model(torch.zeros(1, BLOCK - 4, dtype=torch.long))
    model(torch.zeros(1, BLOCK - 5, dtype=torch.long))  # exactly full is fine
    with pytest.raises(ValueError, match='prompt_pos must lie in'):
        model(torch.zeros(1, 8, dtype=torch.long), prompt_pos=torch.tensor([9]))


def test_omitted_tags_mean_zeros():
    model = make_model(n_lexical=4, n_entity=2)
    randomise_tag_tables(model)
    idx, _, _ = random_batch()
    zeros = torch.zeros_like(idx)
    a, _ = model(idx, all_logits=True)
    b, _ = model(idx, lexical=zeros, entity=zeros, all_logits=True)
    assert torch.equal(a, b)


# ----- initialisation ----------------------------------------------------------------------------


def test_initial_loss_is_close_to_uniform():
    model = make_model(n_lexical=4, n_entity=2, n_prompt=3)
    idx, lexical, entity = random_batch(B=8, T=16)
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(7))
    _, loss = model(idx, targets=targets, lexical=lexical, entity=entity)
    assert abs(loss.item() - math.log(V)) < 0.05


def test_gpt2_initialisation_and_weight_tying():
    model = make_model(n_layer=4, n_embd=256, n_head=4, n_lexical=4, n_entity=2)
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.0005
    assert abs(model.blocks[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.0005
    assert torch.count_nonzero(model.wle.weight) == 0 and torch.count_nonzero(model.wee.weight) == 0


# ----- the embedding sum ---------------------------------------------------------------------------


def test_embedding_is_the_sum_of_four_tables():
    model = make_model(n_lexical=4, n_entity=2)
    randomise_tag_tables(model)
    idx, lexical, entity = random_batch(T=10)
    expected = model.wte(idx) + model.wpe(torch.arange(10)) + model.wle(lexical) + model.wee(entity)
    assert torch.allclose(model.embed(idx, lexical, entity), expected, atol=1e-6)


def test_known_tag_vector_shifts_the_block_input_by_exactly_that_vector():
    model = make_model(n_lexical=4, n_entity=3)
    known = torch.arange(32, dtype=torch.float32) / 8.0
    with torch.no_grad():
        model.wle.weight[2] = known
        model.wee.weight[1] = 2 * known
    idx, _, _ = random_batch(B=1, T=6)
    lexical = torch.zeros_like(idx)
    base = model.embed(idx, lexical, torch.zeros_like(idx))
    lexical[0, 3] = 2
    shifted = model.embed(idx, lexical, torch.zeros_like(idx))
    delta = shifted - base
    assert torch.allclose(delta[0, 3], known, atol=1e-6)
    assert torch.count_nonzero(delta[0, [0, 1, 2, 4, 5]]) == 0
    entity = torch.zeros_like(idx)
    entity[0, 5] = 1
    delta = model.embed(idx, lexical, entity) - shifted
    assert torch.allclose(delta[0, 5], 2 * known, atol=1e-6)
    assert torch.count_nonzero(delta[0, :5]) == 0


# ----- the soft prompt --------------------------------------------------------------------------


@pytest.mark.parametrize('reparam', ['none', 'mlp', 'lstm'])
def test_infix_prompt_lands_at_the_requested_positions(reparam):
    P = 3
    model = make_model(n_prompt=P, n_lexical=4, prompt_reparam=reparam)
    randomise_tag_tables(model)
    if reparam != 'none':  # make the re-parameterisation do something visible
        torch.nn.init.normal_(model.prompt.mlp[-1].weight, std=0.1)
    idx, lexical, _ = random_batch(B=3, T=8)
    prompt_pos = torch.tensor([0, 5, 8])
    x = model.embed(idx, lexical, prompt_pos=prompt_pos)  # (B, T + P, C)
    tokens = model.wte(idx) + model.wle(lexical)
    prompt = model.prompt() + model.wle.weight[0]  # prompt positions carry lexical id 0
    pe = model.wpe.weight
    for b, p in enumerate(prompt_pos.tolist()):
        expected = torch.cat([tokens[b, :p], prompt, tokens[b, p:]]) + pe[: 8 + P]
        assert torch.allclose(x[b], expected, atol=1e-6), f"row {b}, prompt at {p}"


def test_reparameterised_prompt_starts_at_its_free_parameters():
    for reparam in ('mlp', 'lstm'):
        model = make_model(n_prompt=4, prompt_reparam=reparam)
        assert torch.equal(model.prompt(), model.prompt.embedding)


def test_prompt_initialised_from_token_embeddings():
    model = make_model(n_prompt=3)
    model.init_prompt_from_tokens([5, 6, 7])
    assert torch.equal(model.prompt.embedding, model.wte.weight[[5, 6, 7]])
    with pytest.raises(ValueError, match='n_prompt=3'):
        model.init_prompt_from_tokens([1, 2])


def full_hidden_states(model, idx, prompt_pos):
    """Run the blocks by hand over the expanded sequence: (B, T + P, C)."""
    x = model.embed(idx, prompt_pos=prompt_pos)
    for block in model.blocks:
        x = block(x)
    return model.ln_f(x)


def test_prompt_positions_are_not_scored_and_outputs_align_with_tokens():
    P, T = 3, 8
    model = make_model(n_prompt=P)
    idx, _, _ = random_batch(B=2, T=T)
    prompt_pos = torch.tensor([0, 5])
    logits, loss = model(idx, targets=idx, prompt_pos=prompt_pos)
    assert logits.shape == (2, T, V)  # one row per token: no prompt row can enter the loss
    full = model.lm_head(full_hidden_states(model, idx, prompt_pos))  # (B, T + P, V)
    # prefix: token t sits at t + P; its output is its own state
    assert torch.allclose(logits[0], full[0, P:], atol=1e-5)
    # infix before token 5: tokens 0..3 read their own states, token 4 (just before the prompt) reads
    # the last prompt state, which is what predicts token 5; tokens 5.. read theirs, P further on
    assert torch.allclose(logits[1, :4], full[1, :4], atol=1e-5)
    assert torch.allclose(logits[1, 4], full[1, 5 + P - 1], atol=1e-5)
    assert torch.allclose(logits[1, 5:], full[1, 5 + P :], atol=1e-5)
    manual = F.cross_entropy(logits.reshape(-1, V), idx.reshape(-1))
    assert torch.allclose(loss, manual)


def test_targets_minus_one_are_not_scored():
    model = make_model(n_prompt=2)
    idx, _, _ = random_batch(B=2, T=8)
    targets = torch.full_like(idx, -1)
    targets[0, 3], targets[1, 6] = 11, 42
    logits, loss = model(idx, targets=targets)
    manual = (F.cross_entropy(logits[0, 3], torch.tensor(11)) + F.cross_entropy(logits[1, 6], torch.tensor(42))) / 2
    assert torch.allclose(loss, manual, atol=1e-6)


# ----- causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize('n_prompt,prompt_pos', [(0, None), (3, None), (3, 6)])
@pytest.mark.parametrize('attention', ['manual', 'fused'])
def test_a_token_changes_no_earlier_output(n_prompt, prompt_pos, attention):
    model = make_model(n_prompt=n_prompt, attention=attention)
    idx, _, _ = random_batch(B=1, T=12)
    pos = None if prompt_pos is None else torch.tensor([prompt_pos])
    before, _ = model(idx, prompt_pos=pos, all_logits=True)
    for t in (0, 5, 6, 11):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % V
        after, _ = model(changed, prompt_pos=pos, all_logits=True)
        assert torch.equal(before[0, :t], after[0, :t]), f"changing token {t} changed an earlier output"
        assert not torch.allclose(before[0, t], after[0, t]), f"changing token {t} did not change its own output"


def test_class_head_reads_the_requested_position_and_is_causal():
    model = make_model(n_classes=4)
    idx, _, _ = random_batch(B=2, T=10)
    h = model.encode(idx)
    class_pos = torch.tensor([3, 7])
    labels = torch.tensor([1, 2])
    class_logits, loss = model.classify(h, class_pos, labels)
    assert torch.allclose(class_logits[1], model.class_head(h[1, 7]))
    assert torch.allclose(loss, F.cross_entropy(class_logits, labels))
    changed = idx.clone()
    changed[:, 8:] = 0  # tokens after both read positions
    assert torch.equal(model.classify(model.encode(changed), class_pos)[0], class_logits)
    with pytest.raises(ValueError, match='n_classes'):
        make_model().classify(h, class_pos)


# ----- fused attention ----------------------------------------------------------------------------


@pytest.mark.parametrize('n_prompt', [0, 3])
def test_fused_attention_equals_hand_written(n_prompt):
    manual = make_model(n_prompt=n_prompt, n_lexical=4, n_entity=2)
    fused = make_model(n_prompt=n_prompt, n_lexical=4, n_entity=2, attention='fused')
    fused.load_state_dict(manual.state_dict())
    idx, lexical, entity = random_batch(B=2, T=20)
    pos = torch.tensor([0, 9]) if n_prompt else None
    a, loss_a = manual(idx, targets=idx, lexical=lexical, entity=entity, prompt_pos=pos)
    b, loss_b = fused(idx, targets=idx, lexical=lexical, entity=entity, prompt_pos=pos)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(loss_a, loss_b, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    grad_a = manual.blocks[0].attn.c_attn.weight.grad
    grad_b = fused.blocks[0].attn.c_attn.weight.grad
    assert torch.allclose(grad_a, grad_b, atol=1e-6)


# ----- KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize('attention', ['manual', 'fused'])
@pytest.mark.parametrize('n_prompt,prompt_pos', [(0, None), (4, None), (4, 5)])
def test_kv_cache_logits_equal_full_recompute(attention, n_prompt, prompt_pos):
    model = make_model(n_prompt=n_prompt, n_lexical=4, attention=attention)
    randomise_tag_tables(model)
    idx, lexical, _ = random_batch(B=2, T=14, n_entity=0)
    pos = None if prompt_pos is None else torch.tensor([prompt_pos, prompt_pos])
    full, _ = model(idx, lexical=lexical, prompt_pos=pos, all_logits=True)
    cache = model.new_kv_cache()
    first, _ = model(idx[:, :6], lexical=lexical[:, :6], prompt_pos=pos, all_logits=True, kv_cache=cache)
    stepped = [first]
    for t in range(6, 14):
        step, _ = model(idx[:, t : t + 1], lexical=lexical[:, t : t + 1], kv_cache=cache)
        stepped.append(step)
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-5)
    assert cache[0].length == 14 + n_prompt


@pytest.mark.parametrize('n_prompt,prompt_pos', [(0, None), (4, None), (4, 7)])
def test_greedy_generation_with_cache_equals_recompute(n_prompt, prompt_pos):
    model = make_model(n_prompt=n_prompt, n_lexical=4, n_entity=2)
    randomise_tag_tables(model)
    idx, lexical, entity = random_batch(B=2, T=10)
    pos = None if prompt_pos is None else torch.tensor([prompt_pos, 3])
    kwargs = dict(max_new_tokens=40, temperature=0, lexical=lexical, entity=entity, prompt_pos=pos)
    cached = model.generate(idx, use_cache=True, **kwargs)  # 50 tokens: runs past block_size, so it crops
    recomputed = model.generate(idx, use_cache=False, **kwargs)
    assert cached.shape == (2, 50)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :10], idx)


def test_generation_stops_at_eos():
    model = make_model()
    idx, _, _ = random_batch(B=1, T=5, n_lexical=0, n_entity=0)
    greedy = model.generate(idx, max_new_tokens=6, temperature=0)
    eos = greedy[0, 7].item()  # the third new token; make it the end-of-sequence id
    first_eos = greedy[0, 5:].tolist().index(eos) + 5  # (it may come earlier too)
    out = model.generate(idx, max_new_tokens=6, temperature=0, eos_id=eos)
    assert torch.equal(out, greedy[:, : first_eos + 1])  # the same tokens, and not one after the stop id


def test_generation_stops_at_any_of_several_ids():
    model = make_model()
    idx, _, _ = random_batch(B=2, T=5, n_lexical=0, n_entity=0)
    greedy = model.generate(idx, max_new_tokens=8, temperature=0)
    stops = [greedy[0, 6].item(), greedy[1, 7].item()]  # row 0's second token, row 1's third
    out = model.generate(idx, max_new_tokens=8, temperature=0, eos_id=stops)
    for row in range(2):
        new = out[row, 5:].tolist()
        first = next(i for i, t in enumerate(new) if t in stops)
        assert new[:first] == greedy[row, 5 : 5 + first].tolist()
        assert all(t == new[first] for t in new[first:])
    # generation ends as soon as the later row has stopped: 5 + its stop position + 1 tokens
    last_stop = max(next(i for i, t in enumerate(greedy[row, 5:].tolist()) if t in stops) for row in range(2))
    assert out.size(1) == 5 + last_stop + 1


def test_on_token_sees_every_generated_token():
    model = make_model()
    idx, _, _ = random_batch(B=2, T=5, n_lexical=0, n_entity=0)
    seen = []
    out = model.generate(idx, max_new_tokens=7, temperature=0, on_token=seen.append)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 5:])


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).flatten().tolist()) == {0, 1}
    # probabilities ~ .64 .23 .09 .03 .01: top_p 0.8 keeps the first two, which cover it
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).flatten().tolist()) > {0, 1}
    assert torch.equal(sample_next(logits, 0), torch.zeros(200, 1, dtype=torch.long))


# ----- p-tuning and the optimiser ---------------------------------------------------------------------


def test_ptuning_trains_only_the_prompt():
    model = make_model(n_prompt=3, n_lexical=4, n_entity=2, prompt_reparam='mlp')
    model.freeze_for_ptuning(train_lexical=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        'prompt.embedding',
        'prompt.mlp.0.weight',
        'prompt.mlp.0.bias',
        'prompt.mlp.2.weight',
        'prompt.mlp.2.bias',
        'wle.weight',
    }
    assert model.num_params(trainable_only=True) == sum(model.get_parameter(n).numel() for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = configure_optimizers(model, 'adamw', 0.1, 1e-2, (0.9, 0.95), 'cpu')
    model.train()
    idx, lexical, entity = random_batch(B=4, T=12)
    for _ in range(3):
        _, loss = model(idx, targets=idx, lexical=lexical, entity=entity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_ptuning_needs_a_prompt_and_the_tables_it_trains():
    with pytest.raises(ValueError, match='n_prompt > 0'):
        make_model().freeze_for_ptuning()
    with pytest.raises(ValueError, match='cannot train the entity table'):
        make_model(n_prompt=2).freeze_for_ptuning(train_entity=True)
    model = make_model(n_prompt=2, n_classes=3)
    model.freeze_for_ptuning()
    assert model.class_head.weight.requires_grad  # a new head must learn
    assert not model.wte.weight.requires_grad


def test_weight_decay_only_on_trainable_linear_matrices():
    model = make_model(n_prompt=3, n_lexical=4, n_entity=2, n_classes=2)
    optimizer = configure_optimizers(model, 'adamw', 0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    decayed = {id(p) for p in decay['params']}
    expected = {
        id(p)
        for n, p in model.named_parameters()
        if p.dim() == 2 and not n.startswith(('wte', 'wpe', 'wle', 'wee', 'prompt.embedding'))
    }
    assert decayed == expected and len(expected) == 2 * 4 + 1  # 4 matrices per block + class head
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay['params']) == sorted(
        [f'blocks.{i}.{m}.weight' for i in range(2) for m in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')]
        + ['class_head.weight']
    )
    assert sum(p.numel() for g in optimizer.param_groups for p in g['params']) == model.num_params()
    model.freeze_for_ptuning()
    optimizer = configure_optimizers(model, 'adamw', 0.1, 1e-3, (0.9, 0.95), 'cpu')
    n_opt = sum(p.numel() for g in optimizer.param_groups for p in g['params'])
    assert n_opt == model.num_params(trainable_only=True) < model.num_params()


# ----- learning -----------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch():
    model = make_model(n_lexical=4, n_entity=2)
    model.train()
    idx, lexical, entity = random_batch(B=4, T=16)
    optimizer = configure_optimizers(model, 'adamw', 0.0, 3e-3, (0.9, 0.95), 'cpu')
    for _ in range(150):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:], lexical=lexical[:, :-1], entity=entity[:, :-1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"could not memorise one batch: loss {loss.item():.3f}"
