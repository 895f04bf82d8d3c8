"""
The whole CMed-GPT model in one file.

A GPT-2 style decoder (nanoGPT's shape) with the three additions the papers need:
1) an entity-aware input embedding E = Ew + Ep + Et + Ee: token, position, lexical (part-of-speech) and entity
   tables summed in one place (CMed-GPT);
2) a soft prompt of n_prompt trainable vectors, inserted in front of the sequence (CMed-GPT's p-tuning) or at a
   per-example position between source and target (BioGPT);
3) an optional classification head on the same causal model (MEDI-BERPT's multitask).

Attention is written out by hand as the readable reference; config.attention='fused' swaps in torch's
scaled_dot_product_attention, which tests/test_model.py proves equal.

Convention used throughout: the model's outputs are aligned with its input tokens, whatever prompt was inserted.
Output t is the hidden state from which token t+1 is predicted, so logits[:, t] is scored against
targets[:, t] = idx[:, t+1], as in nanoGPT.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 512  # longest sequence, soft prompt included
    vocab_size: int = 8000
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them; a bit faster without)
    n_lexical: int = 0  # part-of-speech table (paper: 4 = other, noun, adjective, verb); 0 = none
    n_entity: int = 0  # entity table (paper: 2 = outside / inside an entity); 0 = none
    n_prompt: int = 0  # soft-prompt vectors for p-tuning; 0 = none
    prompt_reparam: str = 'none'  # 'none', 'mlp' or 'lstm': P-tuning's re-parameterisation of the prompt
    n_classes: int = 0  # classification head outputs; 0 = no head
    attention: str = 'manual'  # 'manual' (hand-written reference) or 'fused' (scaled_dot_product_attention)
    activation: str = 'gelu'  # MLP: 'gelu' (exact, erf) or 'gelu_tanh' (GPT-2's tanh approximation, HF's gelu_new)


class LayerKVCache:
    """Keys and values one attention layer has seen, in a buffer allocated once (no copy per token)."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0  # positions filled so far
        self.k = self.v = None

    def append(self, k, v):
        """Store k, v of shape (B, nh, T, hs); return all keys and values so far, (B, nh, length, hs)."""
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k, self.v = k.new_zeros(B, nh, self.max_len, hs), v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.attention in ('manual', 'fused'), f"attention: 'manual' or 'fused', not {config.attention!r}"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.fused = config.attention == 'fused'
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # causal[i, j]: may position i attend to position j? Only to itself and the past.
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer('causal', causal, persistent=False)

    def forward(self, x, cache=None, mask=None):
        """mask: None (causal), or (B, 1, T, Tk) bool, True where a query may see a key (padded rows)."""
        B, T, C = x.size()
        hs = C // self.n_head
        # q, k, v: (B, T, C) each, split into heads: (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, Tk, hs): the past positions followed by these T
        Tk = k.size(2)
        past, dropout_p = Tk - T, self.dropout if self.training else 0.0
        allowed = self.causal[past:Tk, :Tk] if mask is None else mask  # (T, Tk), or (B, 1, T, Tk) for padded rows
        if not self.fused:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, Tk)
            att = att.masked_fill(~allowed, float('-inf'))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        elif mask is None and past == 0:  # plain causal: lets the kernel pick flash attention
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif mask is None and T == 1:  # one new token sees every cached position: no mask at all
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.activation in ('gelu', 'gelu_tanh'), f"activation {config.activation!r}: 'gelu' or 'gelu_tanh'"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh' if config.activation == 'gelu_tanh' else 'none')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class SoftPrompt(nn.Module):
    """n_prompt trainable input vectors (P-tuning / CMed-GPT's p-tuning).

    With re-parameterisation the vectors are computed from free parameters by a small network (an MLP, or an LSTM
    then an MLP), which the P-tuning paper found trains more stably. The network is residual and its last layer
    starts at zero, so at step 0 the prompt equals the free parameters; that keeps initialising the prompt from
    real token embeddings meaningful.
    """

    def __init__(self, config):
        super().__init__()
        self.reparam = config.prompt_reparam
        assert self.reparam in ('none', 'mlp', 'lstm'), f"prompt_reparam: 'none', 'mlp' or 'lstm', not {self.reparam!r}"
        C = config.n_embd
        self.embedding = nn.Parameter(torch.randn(config.n_prompt, C) * 0.02)  # (P, C)
        if self.reparam == 'lstm':
            self.lstm = nn.LSTM(C, C // 2, num_layers=2, bidirectional=True, batch_first=True)
        if self.reparam != 'none':
            self.mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))

    def forward(self):
        """The prompt vectors, (P, C)."""
        if self.reparam == 'none':
            return self.embedding
        h = self.embedding
        if self.reparam == 'lstm':
            h = self.lstm(h[None])[0][0]  # the LSTM reads the P vectors as one sequence: (1, P, C) -> (P, C)
        return self.embedding + self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)  # Ew: token
        self.wpe = nn.Embedding(config.block_size, C)  # Ep: position
        self.wle = nn.Embedding(config.n_lexical, C) if config.n_lexical else None  # Et: lexical (part of speech)
        self.wee = nn.Embedding(config.n_entity, C) if config.n_entity else None  # Ee: entity
        self.prompt = SoftPrompt(config) if config.n_prompt else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C, bias=config.bias)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens
        self.class_head = nn.Linear(C, config.n_classes) if config.n_classes else None
        self._init_weights()

    def _init_weights(self):
        """GPT-2 initialisation, plus zeros for the tables whose arrival must not change the model."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # each residual branch adds to the stream 2 * n_layer times: scale its output projection down
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        # a tag table added to a pretrained model (fine-tuning) starts as a no-op: E is unchanged at step 0
        for table in (self.wle, self.wee):
            if table is not None:
                nn.init.zeros_(table.weight)
        if self.prompt is not None and self.prompt.reparam != 'none':  # the prompt's network starts as a no-op
            nn.init.zeros_(self.prompt.mlp[-1].weight)
            nn.init.zeros_(self.prompt.mlp[-1].bias)

    # ----- counting and freezing (the optimiser: optim.py) -------------------------------------------------------

    def num_params(self, trainable_only=False):
        """Parameters in the model (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def freeze_for_ptuning(self, train_lexical=False, train_entity=False):
        """Freeze every pretrained weight: only the soft prompt trains, plus the tag tables asked for.
        A classification head is never pretrained, so it stays trainable when there is one."""
        if self.prompt is None:
            raise ValueError("p-tuning needs a soft prompt: set n_prompt > 0")
        for flag, table, name in ((train_lexical, self.wle, 'lexical'), (train_entity, self.wee, 'entity')):
            if flag and table is None:
                raise ValueError(f"cannot train the {name} table: the model has none (n_{name}=0)")
        self.requires_grad_(False)
        tag_tables = [table for flag, table in ((train_lexical, self.wle), (train_entity, self.wee)) if flag]
        for module in [self.prompt, self.class_head, *tag_tables]:
            if module is not None:
                module.requires_grad_(True)

    def init_prompt_from_tokens(self, token_ids):
        """Start the soft prompt at the embeddings of real tokens (one id per prompt vector)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.wte.weight.device)
        if self.prompt is None or ids.numel() != self.config.n_prompt:
            raise ValueError(f"need exactly n_prompt={self.config.n_prompt} token ids, got {ids.numel()}")
        with torch.no_grad():
            self.prompt.embedding.copy_(self.wte.weight[ids])

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, seq_len):
        """Model flops utilisation: achieved flop/s over peak_flops (PaLM appendix B's count), for fwdbwd_per_iter
        sequences of seq_len tokens (which may be shorter than block_size) in dt seconds."""
        # lookups cost no flops: every weight but the position and tag tables (the tied LM head is a matmul)
        n_matmul = self.num_params() - sum(t.weight.numel() for t in (self.wpe, self.wle, self.wee) if t is not None)
        L, H, Q, T = self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head, seq_len
        flops_per_token = 6 * n_matmul + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    # ----- the forward pass --------------------------------------------------------------------

    def _tag_embedding(self, table, ids, idx, name):
        if table is None and ids is not None:
            raise ValueError(f"{name} ids were given but the model has no {name} table (n_{name}=0)")
        return 0 if table is None else table(torch.zeros_like(idx) if ids is None else ids)

    def _prompt_span(self, prompt_pos, idx, past_len, left_pad=None):
        """(B, T + P) bool, True where the P prompt vectors sit: before token prompt_pos[b] of row b (None: before
        its first token, after its padding). None when no prompt is inserted now (none, or already cached)."""
        if self.prompt is None or past_len:
            if prompt_pos is not None:
                raise ValueError("prompt_pos was given but no prompt is inserted (n_prompt=0, or it is already cached)")
            return None
        (B, T), device, first = idx.size(), idx.device, 0 if left_pad is None else left_pad
        start = torch.as_tensor(first if prompt_pos is None else prompt_pos, dtype=torch.long, device=device).expand(B)
        if (start < first).any() or start.max() > T:
            raise ValueError(f"prompt_pos must lie in [left_pad, {T}] for {T} tokens, got {start.tolist()}")
        e = torch.arange(T + self.config.n_prompt, device=device)[None, :] - start[:, None]  # (B, T + P)
        return (e >= 0) & (e < self.config.n_prompt)

    def embed(self, idx, lexical=None, entity=None, prompt_pos=None, past_len=0, left_pad=None):
        """The block input E = wte(idx) + wpe(pos) + wle(lexical) + wee(entity), soft prompt inserted. idx, lexical,
        entity: (B, T); prompt_pos: (B,) where the prompt goes, in token coordinates (None: in front). past_len:
        positions already in the KV cache (the prompt is then in there). left_pad (B,): padding places in front of
        each row (see generate). Returns (B, T + P, C), P = n_prompt if the prompt is inserted now, else 0."""
        span = self._prompt_span(prompt_pos, idx, past_len, left_pad)
        return self._embed(idx, lexical, entity, span, past_len, left_pad)

    def _embed(self, idx, lexical, entity, span, past_len, left_pad):
        (B, T), P, C = idx.size(), self.config.n_prompt, self.config.n_embd
        x = self.wte(idx) + self._tag_embedding(self.wle, lexical, idx, 'lexical')
        x = x + self._tag_embedding(self.wee, entity, idx, 'entity')
        if span is not None:
            # prompt positions carry lexical and entity id 0, like any untagged token
            zero_tags = sum(t.weight[0] for t in (self.wle, self.wee) if t is not None)
            prompt = (self.prompt() + zero_tags).to(x.dtype).expand(B, P, C)
            # scatter: the tokens keep their order in the places outside the span, the prompt fills it
            x = x.new_zeros(B, T + P, C).scatter(1, _places(~span, T, C), x).scatter(1, _places(span, P, C), prompt)
        n_pos = past_len + x.size(1)
        if n_pos > self.config.block_size:
            raise ValueError(
                f"sequence of {n_pos} positions (tokens + {P} prompt vectors) exceeds block_size="
                f"{self.config.block_size}: crop the input"
            )
        pos = torch.arange(past_len, n_pos, dtype=torch.long, device=idx.device)
        if left_pad is not None:  # a padded row starts at position 0 as it would alone (padding: 0 too, unseen)
            pos = (pos - left_pad[:, None]).clamp(min=0)  # (B, T + P)
        return self.drop(x + self.wpe(pos))

    def encode(self, idx, lexical=None, entity=None, prompt_pos=None, kv_cache=None, left_pad=None):
        """Final hidden states (B, T, C), aligned with idx whatever prompt was inserted. left_pad (B,): see embed;
        no real token attends to padding, so a padded row computes what it would alone."""
        past_len = kv_cache[0].length if kv_cache is not None else 0
        span = self._prompt_span(prompt_pos, idx, past_len, left_pad)  # once per forward: in with it, then out
        x = self._embed(idx, lexical, entity, span, past_len, left_pad)
        mask, n_pos = None, past_len + x.size(1)  # padded rows: causal, and no real token sees a padding key
        if left_pad is not None:  # (a padding place sees itself: a row of the mask with no key makes NaNs)
            q, k = torch.arange(past_len, n_pos, device=x.device)[:, None], torch.arange(n_pos, device=x.device)
            mask = ((k <= q) & ((k >= left_pad[:, None, None]) | (k == q)))[:, None]  # (B, 1, T + P, n_pos)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache[i] if kv_cache is not None else None, mask)
        x = self.ln_f(x)
        if span is None:
            return x
        # The alignment rule: output t is the state that predicts token t+1. A token's own state does that, except for
        # the token just before an infix prompt: the state that precedes token t+1 there is the LAST prompt vector,
        # which has read the whole prompt. So the readout is every token's position, with the token before the prompt
        # swapped for the last prompt position (it sits between the same neighbours, so the order is kept). A prefix
        # prompt has no token before it (padding aside, whose outputs mean nothing): its states are not read.
        next_in_span = F.pad(span[:, 1:], (0, 1))  # (B, T + P): the next position holds the prompt
        before_prompt = ~span & next_in_span  # the token just before an infix prompt
        last_prompt = span & ~next_in_span & before_prompt.any(dim=1, keepdim=True)
        readout = (~span & ~before_prompt) | last_prompt  # T places per row
        return x.gather(1, _places(readout, idx.size(1), x.size(-1)))

    def lm_head_loss(self, h, targets=None, all_logits=False, reduction='mean'):
        """Logits (B, T, V) and, given targets (-1: not scored), their cross-entropy (mean, or reduction='sum')."""
        if targets is not None:
            logits = self.lm_head(h)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
            return logits, loss
        # generating: only the last position is needed, unless asked for all
        return self.lm_head(h if all_logits else h[:, [-1], :]), None

    def classify(self, h, class_pos, labels=None):
        """Class logits (B, n_classes) read at class_pos (B,), and the cross-entropy against labels (B,) if given."""
        if self.class_head is None:
            raise ValueError("the model has no classification head: set n_classes > 0")
        class_logits = self.class_head(h[torch.arange(h.size(0), device=h.device), class_pos])
        loss = F.cross_entropy(class_logits, labels) if labels is not None else None
        return class_logits, loss

    def forward(self, idx, targets=None, lexical=None, entity=None, prompt_pos=None, all_logits=False, kv_cache=None):
        h = self.encode(idx, lexical, entity, prompt_pos, kv_cache)
        return self.lm_head_loss(h, targets, all_logits)

    # ----- generation --------------------------------------------------------------------------

    def new_kv_cache(self):
        return [LayerKVCache(self.config.block_size) for _ in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        lexical=None,
        entity=None,
        prompt_pos=None,
        eos_id=None,
        use_cache=True,
        generator=None,
        on_token=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        left_pad=None,
    ):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + new). Sources of different lengths come
        left-padded, left_pad (B,) places in front of each (their ids and tags do not matter; prompt_pos counts
        them): each row is continued exactly as it would be alone. With use_cache, keys and values of the past stay
        in a KV cache (rebuilt after cropping, below): each new token costs one position's compute; use_cache=False
        recomputes all and gives the same result. temperature 0 is greedy; generated tokens get lexical and entity
        id 0. eos_id: one id or a list (e.g. <eot> and the speaker pieces); a row that emits one keeps emitting it;
        all rows stopped: done. on_token(ids (B, 1)) is called each step, e.g. to stream. repetition_penalty and
        no_repeat_ngram_size work as in Hugging Face's generate, over context and reply alike: see penalize_repeats."""
        # the context's tag ids (none where the model has no such table); a restart pads them with 0 for new tokens
        given = dict(lexical=lexical if self.wle is not None else None, entity=entity if self.wee is not None else None)
        room = self.config.block_size - self.config.n_prompt  # tokens that fit beside the prompt
        if room < 1:
            raise ValueError(f"n_prompt={self.config.n_prompt} leaves no room in block_size={self.config.block_size}")
        (B, T), device = idx.size(), idx.device
        pad = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long, device=device).expand(B)
        if pad is not None and (pad.min() < 0 or pad.max() >= T):
            raise ValueError(f"left_pad must lie in [0, {T}) for {T} places: every row needs a token")
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stop_ids = None if eos_id is None else torch.as_tensor(eos_id, device=device).flatten()
        cache = pad_now = None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if cache is not None and cache[0].length < self.config.block_size:
                h = self.encode(idx[:, -1:], kv_cache=cache, left_pad=pad_now)  # a generated token: tag ids 0
            else:
                # (re)start: the whole context, cropped to the newest places that fit beside the prompt. Positions
                # are absolute: once the oldest token is cropped every cached key has moved, so the cache is rebuilt.
                crop = max(0, T - room)
                pad_now = None if pad is None else (pad - crop).clamp(min=0)  # cropping takes padding first
                pos = None  # where the prompt goes in the cropped context (never into padding: prompt_pos >= pad)
                if prompt_pos is not None and self.prompt is not None:
                    pos = (torch.as_tensor(prompt_pos, device=device) - crop).clamp(min=0)
                tags = {k: None if t is None else F.pad(t, (0, T - t.size(1)))[:, crop:] for k, t in given.items()}
                cache = self.new_kv_cache() if use_cache else None
                h = self.encode(idx[:, crop:], prompt_pos=pos, kv_cache=cache, left_pad=pad_now, **tags)
            logits = penalize_repeats(self.lm_head(h[:, -1, :]), idx, repetition_penalty, no_repeat_ngram_size, pad)
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if stop_ids is not None:
                next_id = torch.where(finished[:, None], idx[:, -1:], next_id)  # a finished row repeats its stop id
                finished |= torch.isin(next_id[:, 0], stop_ids)
            idx = torch.cat([idx, next_id], dim=1)
            if on_token is not None:
                on_token(next_id)
            if stop_ids is not None and finished.all():
                break
        return idx


def _places(mask, n, C):
    """Indices of the n True entries of each row of mask (B, L), in order, expanded to (B, n, C) for
    gather/scatter. A stable sort finds them instead of mask indexing, so no device-to-host sync."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :n, None].expand(-1, -1, C)


def penalize_repeats(logits, idx, repetition_penalty=1.0, no_repeat_ngram_size=0, left_pad=None):
    """Logits (B, V) for the next token after idx (B, T), with Hugging Face's two rules against loops: every
    token already in idx has its logit divided by repetition_penalty (multiplied, when negative: CTRL's rule,
    so that the penalty always lowers it), and a token that would repeat an n-gram of idx
    (n = no_repeat_ngram_size) is forbidden. left_pad (B,): places of padding at the start of each row, not tokens."""
    first = torch.zeros_like(idx[:, :1]) if left_pad is None else left_pad[:, None]  # (B, 1): a row's first token
    real = torch.arange(idx.size(1), device=idx.device) >= first  # (B, T)
    idx = torch.where(real, idx, idx.gather(1, first))  # padding copies the first token: no token seen that was not
    if repetition_penalty != 1.0:
        seen = logits.gather(1, idx)
        logits = logits.scatter(1, idx, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    n = no_repeat_ngram_size
    if n > 0 and idx.size(1) >= n:
        ngrams = idx.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram so far
        # an n-gram whose first n - 1 tokens are the last n - 1 tokens would be repeated by its last token
        repeats = (ngrams[:, :, :-1] == idx[:, idx.size(1) - n + 1 :][:, None, :]).all(dim=-1)  # (B, T - n + 1)
        repeats &= real[:, : repeats.size(1)]  # an n-gram that starts in the padding is none
        banned = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, ngrams[:, :, -1], repeats.long())
        logits = logits.masked_fill(banned > 0, float('-inf'))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V): greedy at temperature 0, else sample from the
    temperature-scaled distribution cut to the top_k tokens and/or the top_p probability mass."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p (the first token always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float('-inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
