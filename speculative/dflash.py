"""DFlash block drafter: one non-causal pass over [anchor, MASK x (B-1)] predicts the whole block.

Target context features (several layers, fused by `fc` + RMSNorm) enter every draft layer as
extra keys/values in front of the block ("KV injection"); queries come from the block only.
The embedding and LM head are the target's, frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from draft_opd.speculative.drafter import Drafter, DrafterConfig, DraftState, Pick, ProposeRequest
from draft_opd.speculative.layers import KVCache, SwiGLU, apply_rotary, attend, rotary_cos_sin


class InjectedAttention(nn.Module):
    """Block queries attend to [cached context, new context, block] keys; context keys come from features."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], n, self.head_dim).transpose(0, 1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        kv_in = torch.cat([context, x])
        q = self.q_norm(self.heads(self.q_proj(x), self.num_heads))
        k = self.k_norm(self.heads(self.k_proj(kv_in), self.num_kv_heads))
        v = self.heads(self.v_proj(kv_in), self.num_kv_heads)
        q = apply_rotary(q, cos[-x.shape[0] :], sin[-x.shape[0] :])
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], -1))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = InjectedAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, context, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), context, cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(Drafter):
    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head: nn.Module):
        super().__init__(cfg, embed_weight, head)
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(features))

    def block_hidden(
        self,
        block_tokens: torch.Tensor,
        context: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised hidden states of a block. `positions` cover [context, block]; `context` is fused."""
        x = self.embed(block_tokens)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, context, cos, sin, cache, i, mask)
        return self.norm(x)

    def proposal_hidden(self, state: DraftState, anchor: torch.Tensor, position: int, n: int) -> torch.Tensor:
        """Normalised hidden states [n, H] of the n proposals after `anchor`; consumes the pending features."""
        feats, _, start = state.take_pending(position)
        mask_id = torch.full((n,), self.cfg.mask_token_id, dtype=anchor.dtype, device=anchor.device)
        block = torch.cat([anchor.view(1), mask_id])
        positions = torch.arange(start, position + n + 1, device=anchor.device)
        hidden = self.block_hidden(block, self.fuse(feats), positions, state.cache)
        state.cache.crop(position)
        return hidden[1:]

    @torch.inference_mode()
    def propose(
        self, state: DraftState, anchor: torch.Tensor, position: int, n: int, pick: Pick
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.target_logits(self.proposal_hidden(state, anchor, position, n)).float()
        return pick(logits), logits

    @torch.inference_mode()
    def propose_rows(self, requests: list[ProposeRequest]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A block's proposals read only the context, so the rows share one pass of the LM head: with few rows
        per call its GEMM is far from peak on CPU (docs/results/benchmarks.md#rollout)."""
        hidden = [self.proposal_hidden(r.state, r.anchor, r.position, r.n) for r in requests]
        logits = self.target_logits(torch.cat(hidden)).float().split([h.shape[0] for h in hidden])
        return [(r.pick(x), x) for r, x in zip(requests, logits)]

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        anchors: torch.Tensor,
        chain_tokens: torch.Tensor,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Re-draft one block from each anchor of a sequence in one pass (training: SFT and error-position replay).

        Each block [tokens[a], MASK x W] sees the target features of positions < a and itself,
        exactly what `propose` sees at inference. features [T, F], tokens [T], anchors [N],
        chain_tokens [N, W-1] (only its width matters: a block needs no inputs but the anchor)
        -> logits [N, W, V] for offsets 1..W. widths [N]: a block cut short to widths[i] < W proposals at rollout
        hides its offsets past widths[i] from the rest, as `propose` drafted it; their logits are padding.
        """
        width = chain_tokens.shape[1] + 1
        n, b, t = anchors.shape[0], width + 1, features.shape[0]
        block = torch.full((n, b), self.cfg.mask_token_id, dtype=tokens.dtype, device=tokens.device)
        block[:, 0] = tokens[anchors]
        block_pos = anchors[:, None] + torch.arange(b, device=tokens.device)
        owner = torch.arange(n, device=tokens.device).repeat_interleave(b)
        sees_context = torch.arange(t, device=tokens.device)[None, :] < anchors[owner][:, None]
        last = anchors.new_full((n,), width) if widths is None else widths.to(anchors.device)
        drafted = torch.arange(b, device=tokens.device).repeat(n) <= last[owner]  # anchor + proposals drafted
        sees_block = (owner[:, None] == owner[None, :]) & drafted[None, :]
        mask = torch.cat([sees_context, sees_block], dim=1)
        positions = torch.cat([torch.arange(t, device=tokens.device), block_pos.flatten()])
        hidden = self.block_hidden(block.flatten(), self.fuse(features), positions, None, mask)
        return self.target_logits(hidden).view(n, b, -1)[:, 1:].float()
