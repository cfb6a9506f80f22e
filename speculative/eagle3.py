"""EAGLE-3 drafter: one decoder layer over [token embedding ; fused target feature], autoregressive.

The first step of a block consumes the true target features of every position committed since
the last block; later steps feed the drafter's own output hidden state back in place of the
target feature (chain drafting). Its LM head is its own, optionally over a reduced vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from draft_opd.speculative.drafter import Drafter, DrafterConfig, DraftState, Pick
from draft_opd.speculative.layers import KVCache, SwiGLU, apply_rotary, attend, rotary_cos_sin


class Eagle3Layer(nn.Module):
    """Attention reads concat(norm(embedding), norm(hidden)) (2H); the residual stream is the hidden."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(h, cfg.intermediate_size)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t = embeds.shape[0]
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(0, k, v)
        out = self.o_proj(attend(q, k, v, mask).transpose(0, 1).reshape(t, -1))
        h = hidden + out
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(query_len: int, cached: int, device: torch.device) -> torch.Tensor | None:
    """Rows see every cached position and the new positions up to their own."""
    if query_len == 1:
        return None
    rows = torch.arange(query_len, device=device)[:, None] + cached
    return torch.arange(cached + query_len, device=device)[None, :] <= rows


class Eagle3Drafter(Drafter):
    chained = True

    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head: nn.Module):
        if cfg.num_layers != 1:
            raise ValueError(f"an eagle3 drafter has one decoder layer (got num_layers={cfg.num_layers})")
        super().__init__(cfg, embed_weight, head)
        h = cfg.hidden_size
        vocab = cfg.draft_vocab_size or cfg.vocab_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.layer = Eagle3Layer(cfg)
        self.norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        self.register_buffer("d2t", torch.arange(vocab))  # draft id -> target id
        with torch.no_grad():
            self.lm_head.weight.copy_(head.weight[:vocab])

    @torch.no_grad()
    def restrict_vocab(self, target_ids: torch.Tensor) -> None:
        """Draft over `target_ids` alone (cfg.draft_vocab_size distinct target ids: EAGLE-3 and SpecForge take a
        corpus's most frequent tokens), each head row started from the target's LM head row of its token."""
        ids = torch.as_tensor(target_ids, dtype=torch.int64).sort().values
        if ids.numel() != self.d2t.numel() or ids.unique().numel() != ids.numel():
            raise ValueError(
                f"a draft vocabulary needs {self.d2t.numel()} distinct target ids (draft.draft_vocab_size); "
                f"got {ids.numel()} with {ids.unique().numel()} distinct"
            )
        self.d2t.copy_(ids)
        self.lm_head.weight.copy_(self._shared[1].weight[ids].to(self.lm_head.weight.dtype))

    def step(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer pass over (token, hidden) pairs; returns the pre-norm output hidden states."""
        embeds = self.embed(tokens)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        return self.layer(embeds, hidden, cos, sin, cache, mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary; tokens outside the draft vocabulary get -inf."""
        draft = self.lm_head(self.norm(hidden)).float()
        if draft.shape[-1] == self.cfg.vocab_size:
            return draft
        full = draft.new_full((*draft.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, draft)

    @torch.inference_mode()
    def propose(
        self, state: DraftState, anchor: torch.Tensor, position: int, n: int, pick: Pick
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, tokens, start = state.take_pending(position)
        next_tokens = torch.cat([tokens[1:], anchor.view(1)])  # pair feature t with token t+1
        positions = torch.arange(start, position, device=anchor.device)
        mask = causal_mask(len(positions), len(state.cache), anchor.device)
        hidden = self.step(next_tokens, self.fc(feats), positions, state.cache, mask)[-1:]
        drafted, all_logits = [], []
        for i in range(n):
            logits = self.logits(hidden)
            token = pick(logits)
            drafted.append(token)
            all_logits.append(logits)
            if i + 1 < n:
                pos = torch.tensor([position + i], device=anchor.device)
                hidden = self.step(token, hidden, pos, state.cache)
        state.cache.crop(position)
        return torch.cat(drafted), torch.cat(all_logits)

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        anchors: torch.Tensor,
        chain_tokens: torch.Tensor,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unroll a chain from each anchor at once (training-time test and error-position replay).

        Step 1 of anchor a reads the true features of every position < a (one causal pass shared
        by all anchors); step k >= 2 feeds back its own hidden state with input token
        chain_tokens[:, k-2] (the recorded proposals to replay a rollout, the true tokens for SFT),
        attending to the shared prefix and to its own chain only. features [T, F], tokens [T],
        anchors [N] (>= 1), chain_tokens [N, W-1] -> logits [N, W, V]. A chain is causal, so a block cut short
        needs no `widths`: its offsets are the first of a full-width chain's.
        """
        t, n = features.shape[0], anchors.shape[0]
        device = tokens.device
        cache = KVCache(1)
        prefix = torch.arange(t - 1, device=device)
        hidden = self.step(tokens[1:], self.fc(features[:-1]), prefix, cache, causal_mask(t - 1, 0, device))
        h = hidden[anchors - 1]
        logits = [self.logits(h)]
        owner = torch.arange(n, device=device)
        sees_prefix = prefix[None, :] < anchors[:, None]
        for k in range(chain_tokens.shape[1]):
            chain_cols = torch.arange(n * (k + 1), device=device) % n
            mask = torch.cat([sees_prefix, owner[:, None] == chain_cols[None, :]], dim=1)
            h = self.step(chain_tokens[:, k], h, anchors + k, cache, mask)
            logits.append(self.logits(h))
        return torch.stack(logits, dim=1)
