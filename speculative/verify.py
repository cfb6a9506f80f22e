"""Lossless verification of a draft block against the target's logits.

Row i of the target's block logits predicts the token after block position i, so proposal i
(0-based) is checked against row i and the bonus token comes from row `accepted`.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """T = 0: accept the longest prefix equal to the target's argmax; the bonus is the target's next argmax."""
    posterior = target_logits.argmax(dim=-1)
    accepted = int((draft == posterior[:-1]).int().cumprod(0).sum())
    return accepted, posterior[accepted]


def verify_sampling(
    draft: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, torch.Tensor]:
    """T > 0: accept x with probability min(1, p(x)/q(x)); at the first rejection resample from
    normalize(max(0, p - q)); if all are accepted, sample the bonus from p. Exact in distribution."""
    n = draft.shape[0]
    rows = torch.arange(n, device=draft.device)
    p = target_probs[rows, draft]
    q = draft_probs[rows, draft]
    u = torch.rand(n, generator=generator, device=draft.device)
    accepted = int((u * q < p).int().cumprod(0).sum())
    if accepted == n:
        dist = target_probs[n]
    else:
        residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else target_probs[accepted]
    return accepted, torch.multinomial(dist, 1, generator=generator)[0]
