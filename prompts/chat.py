"""Turning conversations into prompt tokens with the target's chat template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], thinking: bool) -> list[int]:
    """Token ids of `messages` plus the assistant's generation prompt.

    `enable_thinking` is Qwen3's switch; templates without it ignore the variable. A tokenizer
    with no chat template gets the user turns joined by blank lines.
    """
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, enable_thinking=thinking, return_dict=False
    )
    return list(ids)


def render_first_turn(tokenizer: PreTrainedTokenizerBase, first_turn: str, thinking: bool) -> list[int]:
    """A conversation's first user turn as a prompt: what rollouts, corpora and held-out tau decode."""
    return render_prompt(tokenizer, [{"role": "user", "content": first_turn}], thinking)
