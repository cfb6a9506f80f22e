"""Prompt sets and chat rendering: the benchmark and training prompts, read from local files, as the target's tokens.

Training (the rollout actors) and evaluation both read prompts from here, so this room sits below both.
"""
