"""What every drafter shares: its config, the target's frozen embedding and head, state, save/load.

The decode loop drives a drafter through three calls:
- `begin(features, tokens)` after prefill: the target features of the prompt;
- `propose(state, anchor, position, n, pick)`: n proposals after the last committed token
  (`propose_rows` for the rows of a batched rollout at once);
- `extend(state, features, tokens, start)` after verification: the committed tokens' features.
Features of a position are consumed lazily by the next `propose`, so a verify pass feeds the
drafter without any extra target work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from draft_opd.speculative.layers import KVCache

Pick = Callable[[torch.Tensor], torch.Tensor]  # logits [k, V] -> tokens [k]


@dataclass
class DrafterConfig:
    """Architecture of a drafter; the target-derived fields are filled by `complete_config`."""

    kind: str = "dflash"  # dflash | eagle3
    block_size: int = 16  # verify block = anchor + (block_size - 1) proposals
    num_layers: int = 1
    target_layer_ids: list[int] = field(default_factory=list)
    mask_token_id: int | None = None
    draft_vocab_size: int | None = None  # eagle3: reduced head over the most frequent tokens
    hidden_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        if self.kind not in ("dflash", "eagle3"):
            raise ValueError(f"unknown drafter kind {self.kind!r} (draft.kind); use dflash or eagle3")
        if self.block_size is not None and self.block_size < 1:  # None: a DraftSpec keeping its checkpoint's
            raise ValueError(f"draft.block_size must be >= 1 (got {self.block_size}); 1 means plain decoding")
        if self.num_layers < 1:
            raise ValueError(f"draft.num_layers must be >= 1 (got {self.num_layers})")


def default_layer_ids(kind: str, num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash: evenly spaced from layer 1 to L-3; EAGLE-3: low, middle, high ([1, L//2-1, L-4])."""
    top = num_target_layers - 2  # the last layer's output is normalised: not a feature
    if kind == "eagle3":
        ids = [1, num_target_layers // 2 - 1, num_target_layers - 4]
    else:
        hi = max(num_target_layers - 3, 1)
        n = max(num_draft_layers, 1)
        ids = [round(1 + i * (hi - 1) / (n - 1)) for i in range(n)] if n > 1 else [1]
    return [min(max(i, 0), top) for i in ids]


def complete_config(cfg: DrafterConfig, target_config) -> DrafterConfig:
    """Fill the fields a drafter copies from its target (hidden size, heads, rope, vocab)."""
    tc = target_config
    filled = DrafterConfig(**asdict(cfg))
    filled.hidden_size = filled.hidden_size or int(tc.hidden_size)
    filled.intermediate_size = filled.intermediate_size or int(tc.intermediate_size)
    filled.num_heads = filled.num_heads or int(tc.num_attention_heads)
    filled.num_kv_heads = filled.num_kv_heads or int(getattr(tc, "num_key_value_heads", None) or filled.num_heads)
    filled.head_dim = filled.head_dim or int(getattr(tc, "head_dim", None) or filled.hidden_size // filled.num_heads)
    filled.vocab_size = filled.vocab_size or int(tc.vocab_size)
    filled.rms_norm_eps = float(getattr(tc, "rms_norm_eps", filled.rms_norm_eps))
    rope = getattr(tc, "rope_parameters", None) or {}
    filled.rope_theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", filled.rope_theta)))
    if not filled.target_layer_ids:
        filled.target_layer_ids = default_layer_ids(filled.kind, int(tc.num_hidden_layers), filled.num_layers)
    return filled


@dataclass
class DraftState:
    """Per-sequence drafter state: its KV cache and the target features not yet consumed."""

    cache: KVCache
    pending_features: list[torch.Tensor] = field(default_factory=list)
    pending_tokens: list[torch.Tensor] = field(default_factory=list)
    pending_start: int = 0

    def take_pending(self, anchor_position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Features and tokens not yet consumed, and their first position; they must end at the anchor."""
        feats, toks = torch.cat(self.pending_features), torch.cat(self.pending_tokens)
        start = self.pending_start
        if start + feats.shape[0] != anchor_position:
            raise RuntimeError(f"drafter context ends at {start + feats.shape[0]}, anchor is at {anchor_position}")
        self.pending_features, self.pending_tokens = [], []
        self.pending_start = start + feats.shape[0]
        return feats, toks, start


@dataclass
class ProposeRequest:
    """One row's `propose` arguments, for `Drafter.propose_rows`."""

    state: DraftState
    anchor: torch.Tensor
    position: int
    n: int
    pick: Pick


class Drafter(nn.Module):
    """Base class. Shared target weights are held outside the module tree: never saved or trained."""

    chained = False  # whether a proposal reads the block's earlier proposals (EAGLE-3) or only the context (DFlash)

    def __init__(self, cfg: DrafterConfig, embed_weight: torch.Tensor, head: nn.Module):
        super().__init__()
        self.cfg = cfg
        self._shared = (embed_weight, head)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self._shared[0])

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._shared[1](hidden)

    def begin(self, features: torch.Tensor, tokens: torch.Tensor) -> DraftState:
        state = DraftState(cache=KVCache(self.cfg.num_layers))
        self.extend(state, features, tokens, 0)
        return state

    def extend(self, state: DraftState, features: torch.Tensor, tokens: torch.Tensor, start: int) -> None:
        expected = state.pending_start + sum(f.shape[0] for f in state.pending_features)
        if start != expected:
            raise RuntimeError(f"drafter fed position {start}, expected {expected}: features must arrive in order")
        state.pending_features.append(features.to(self._shared[0].dtype))
        state.pending_tokens.append(tokens)

    def propose(
        self, state: DraftState, anchor: torch.Tensor, position: int, n: int, pick: Pick
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return n draft tokens after `anchor` (at `position`) and their logits [n, V]."""
        raise NotImplementedError

    def propose_rows(self, requests: list[ProposeRequest]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`propose` for each request, in order (each row's `pick` is called once, as `propose` calls it).
        A drafter whose proposals need no earlier pick of their row overrides this to share the work."""
        return [self.propose(r.state, r.anchor, r.position, r.n, r.pick) for r in requests]

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        anchors: torch.Tensor,
        chain_tokens: torch.Tensor,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training: re-draft a block of W = chain_tokens.shape[1] + 1 proposals from each anchor of one
        sequence at once, as `propose` would have at inference; logits [N, W, V]. widths [N] (default W):
        proposals the rollout drafted per block (fewer in a block cut by max_new_tokens); offsets past a
        block's width are padding, which its proposals must not see."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(native_config(self.cfg), indent=2))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / "model.safetensors")
        )
        return out


def check_mask_token(cfg: DrafterConfig, key: str) -> None:
    """A DFlash block is [anchor, MASK...]: the mask must be a token of the target (one it never emits)."""
    if cfg.kind == "dflash" and cfg.mask_token_id is None:
        raise ValueError(f"a dflash drafter needs {key} (a token id the target never emits)")
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise ValueError(
            f"{key}={cfg.mask_token_id} is not a token of this target (vocab {cfg.vocab_size}); "
            "use an id the target never emits, e.g. an unused special token"
        )


def native_config(cfg: DrafterConfig) -> dict:
    """The config.json of our own checkpoints."""
    return {"architecture": "draft_opd", **asdict(cfg)}


def read_native_config(raw: dict) -> DrafterConfig:
    """The inverse of `native_config`; keys of other versions are ignored."""
    known = {f.name for f in fields(DrafterConfig)}
    return DrafterConfig(**{k: v for k, v in raw.items() if k in known})
