"""`make bench-verify`: one verify step of a 16-token block next to one plain decode step.

The verify pass is the hot path of speculative decoding; on CPU its cost relative to a 1-token
step decides whether drafting can pay off at all (break-even tau = verify(16) / decode(1)).
Both are measured interleaved in one run, at the same context length, on the same target:
as loaded (F.linear) and pre-transposed (our Target), in fp32 and bf16.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from draft_opd.launch.config import load_config
from draft_opd.speculative.pretrained import load_pretrained
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import Target, crop_cache
from draft_opd.speculative.testbeds import load_testbed

CONTEXT, BLOCK, REPEATS = 256, 16, 25


def time_step(target: Target, cache, tokens: torch.Tensor, with_features: bool) -> float:
    start = time.perf_counter()
    target.forward(tokens, CONTEXT, cache, with_features=with_features)
    elapsed = time.perf_counter() - start
    crop_cache(cache, CONTEXT)
    return elapsed


def measure(target: Target) -> dict[str, float]:
    """Median seconds of decode(1) and verify(16), interleaved so machine noise hits both alike."""
    gen = torch.Generator().manual_seed(0)
    vocab = target.vocab_size
    cache = target.new_cache()
    target.forward(torch.randint(0, vocab, (CONTEXT,), generator=gen), 0, cache, with_features=False)
    one, block = torch.randint(0, vocab, (1,), generator=gen), torch.randint(0, vocab, (BLOCK,), generator=gen)
    decode, verify = [], []
    for i in range(REPEATS + 3):
        d, v = time_step(target, cache, one, False), time_step(target, cache, block, True)
        if i >= 3:  # warm-up
            decode.append(d)
            verify.append(v)
    return {"decode_1_ms": 1e3 * statistics.median(decode), "verify_16_ms": 1e3 * statistics.median(verify)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv[0] if argv else "configs/smol.yaml", argv[1:])
    set_threads(cfg.threads)
    layers = list(cfg.draft.target_layer_ids)
    rows = []
    for dtype in ("float32", "bfloat16"):
        if cfg.target.testbed:
            model, tok = load_testbed(cfg.target.testbed, dtype=dtype)
        else:
            model, tok = load_pretrained(cfg.target.path, cfg.target.gguf_file, dtype)
        for pretranspose in (False, True):
            target = Target(model, tok, layers, pretranspose=pretranspose)
            result = measure(target)
            rows.append(
                {
                    "dtype": dtype,
                    "weights": "pre-transposed" if pretranspose else "as loaded (F.linear)",
                    **result,
                    "ratio": result["verify_16_ms"] / result["decode_1_ms"],
                }
            )
    table = Table(
        title=f"{cfg.name}: verify({BLOCK}) vs decode(1) at context {CONTEXT}, "
        f"{torch.get_num_threads()} threads (median of {REPEATS})"
    )
    for col in ("dtype", "weights", "decode(1) ms", f"verify({BLOCK}) ms", "verify/decode"):
        table.add_column(col, justify="left" if col in ("dtype", "weights") else "right")
    for r in rows:
        table.add_row(
            r["dtype"], r["weights"], f"{r['decode_1_ms']:.1f}", f"{r['verify_16_ms']:.1f}", f"{r['ratio']:.2f}x"
        )
    Console(width=120).print(table)
    out = Path("runs/bench-verify.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": cfg.name, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
