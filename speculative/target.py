"""The frozen target model: one forward gives verification logits and drafter features.

Any Hugging Face causal LM works (Qwen3, Llama, ...). The wrapper runs the base decoder with
the caller's KV cache and returns the hidden states of the layers that drafters condition on,
so that a verify pass serves both the acceptance test and the drafter's next context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from draft_opd.speculative.pretrained import load_pretrained
from draft_opd.speculative.testbeds import load_testbed


@dataclass
class TargetConfig:
    """Where the target comes from. `testbed` (tiny, smol) wins over `path`."""

    testbed: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    thinking: bool = True  # chat templates with a thinking switch (Qwen3) render thinking mode


class FrozenLinear(nn.Module):
    """A frozen linear layer that keeps W and a contiguous W^T and picks the faster GEMM per call.

    On CPU in fp32, a decode step (one row) runs several times faster as `x @ W^T` on a
    pre-transposed weight than through `F.linear`, while a verify block (16 rows) is faster
    through `F.linear` (bench-verify measures both). Frozen weights make the second copy free
    of bookkeeping; it costs memory only, so it is used for CPU fp32 targets alone.
    """

    ROWS_FOR_TRANSPOSED = 4

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach(), persistent=False)
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > self.ROWS_FOR_TRANSPOSED:
            return nn.functional.linear(x, self.weight, self.bias)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def freeze_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear below `module` by a FrozenLinear (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FrozenLinear(child))
        else:
            freeze_linears(child)
    return module


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [T, V] float32 ([B, T, V] from forward_batch)
    features: torch.Tensor  # [T, len(feature_layers) * H] ([B, T, ...] from forward_batch)


class Target:
    """A frozen causal LM with a KV cache interface for verification.

    `feature_layers` are 0-based decoder layer indices; the feature of a layer is its output
    hidden state (the convention of DFlash and EAGLE-3: `hidden_states[layer + 1]`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        feature_layers: list[int] | None = None,
        thinking: bool = True,
        pretranspose: bool | None = None,
    ):
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.thinking = thinking
        self.decoder = model.get_decoder()
        self.embed_tokens: nn.Embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if pretranspose is None:  # measured faster only for fp32 on CPU (bench-verify)
            pretranspose = head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
        self.lm_head = FrozenLinear(head) if pretranspose else head
        if pretranspose:
            freeze_linears(self.decoder)
        self.num_layers = int(self.config.num_hidden_layers)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.lm_head.out_features)
        self.feature_layers: list[int] = []
        self.set_feature_layers(feature_layers or [])

    def set_feature_layers(self, layers: list[int]) -> None:
        bad = [i for i in layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(
                f"feature layers {bad} out of range for a {self.num_layers}-layer target "
                f"(use 0..{self.num_layers - 2}; the last layer's output is normalised)"
            )
        self.feature_layers = list(layers)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.no_grad()  # not inference_mode: the learner feeds these features into a graph
    def forward(
        self, input_ids: torch.Tensor, start: int, cache: DynamicCache | None, with_features: bool = True
    ) -> TargetOutput:
        """Run `input_ids` ([T] or [1, T]) at positions start..start+T-1 on top of `cache`."""
        ids = input_ids.view(1, -1)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        out = self.forward_batch(ids, positions, cache, None, with_features)
        return TargetOutput(logits=out.logits[0], features=out.features[0])

    @torch.no_grad()
    def forward_batch(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
        visible: torch.Tensor | None,
        with_features: bool = True,
    ) -> TargetOutput:
        """Run rows `input_ids` [B, T] at `positions` [B, T]; `visible` [B, 1, T, cached + T] (True = attend)
        replaces the causal mask, so rows of a shared cache can hold different lengths. Outputs [B, T, ...]."""
        want_hidden = with_features and bool(self.feature_layers)
        if visible is not None and self.config._attn_implementation != "sdpa":  # eager and others add a bias
            visible = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(self.dtype).min
            )
        out = self.decoder(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=visible,
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=want_hidden,
        )
        logits = self.lm_head(out.last_hidden_state).float()
        if want_hidden:
            features = torch.cat([out.hidden_states[i + 1] for i in self.feature_layers], dim=-1)
        else:
            features = logits.new_empty(*input_ids.shape, 0)
        return TargetOutput(logits=logits, features=features)

    def stop_token_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = getattr(self.config, "eos_token_id", None)
        gen = getattr(self.model, "generation_config", None)
        for value in (
            eos,
            getattr(gen, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None,
        ):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return sorted(ids)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of `cache` (transformers 5 crops by a negative count)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def load_target(cfg: TargetConfig, feature_layers: list[int] | None = None) -> Target:
    """Build the frozen target of a config: a testbed by name, or a pretrained model."""
    layers = list(feature_layers or [])
    if cfg.testbed:
        model, tokenizer = load_testbed(cfg.testbed, dtype=cfg.dtype)
    elif cfg.path:
        model, tokenizer = load_pretrained(cfg.path, cfg.gguf_file, cfg.dtype)
    else:
        raise ValueError("no target configured: set target.testbed (tiny, smol) or target.path")
    return Target(model, tokenizer, layers, thinking=cfg.thinking)
