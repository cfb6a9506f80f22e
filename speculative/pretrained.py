"""Loading a Hugging Face causal LM and its tokenizer: a local directory, a hub id, or a GGUF file.

Both kinds of target use it: a model the user names (`target.path`) and the built-in testbeds, whose
smol weights arrive as GGUF. Every failure becomes one `TargetNotFoundError` that names the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


class TargetNotFoundError(FileNotFoundError):
    """The target could not be found locally nor fetched from the hub."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def _missing_target(source: str, cause: Exception) -> TargetNotFoundError:
    return TargetNotFoundError(
        f"cannot load target {source!r}: {cause.__class__.__name__}: {(str(cause).splitlines() or [''])[0]}\n"
        "Fix: set target.path to a local model directory (config.json + weights), a .gguf file, or a hub id "
        "that is cached or reachable (HF_HUB_OFFLINE=1 uses the local cache only); for the built-in testbeds "
        "set target.testbed=tiny or target.testbed=smol (prepare smol once with `make smol`)."
    )


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user meant as a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf")


def load_pretrained(
    path: str, gguf_file: str | None = None, dtype: str = "float32"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a directory, a hub id, or a GGUF file."""
    source = str(Path(path).expanduser()) if _looks_like_path(str(path)) else str(path)
    if gguf_file is None and source.endswith(".gguf"):
        source, gguf_file = str(Path(source).parent), Path(source).name
    missing = Path(source) / gguf_file if gguf_file else Path(source)
    if _looks_like_path(str(path)) and not missing.exists():
        raise _missing_target(str(path), FileNotFoundError(f"no such file or directory: {missing}"))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype), **kwargs)
    except (OSError, ValueError) as err:
        raise _missing_target(str(path), err) from err
    return model, tokenizer
