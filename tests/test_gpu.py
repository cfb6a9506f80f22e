"""CUDA paths, prepared for a machine with a GPU: skipped cleanly without one (`make gpu-check` runs them).

Lossless decoding and batched rollouts of the tiny Qwen3 on the GPU, in fp32 and bf16, against plain greedy
decoding on the same device. Nothing else in the project depends on a GPU.
"""

import pytest
import torch

from draft_opd.speculative.batch_decode import generate_batch
from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.target import Target
from draft_opd.speculative.testbeds import tiny_model, tiny_tokenizer
from tests.conftest import TINY_FEATURE_LAYERS, make_drafter
from tests.test_decode import PartlyRightDrafter, prompt_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `make gpu-check` on a GPU machine)"),
]
PROMPTS = [prompt_of(length, seed) for seed, length in enumerate([3, 17, 40])]


def cuda_target(dtype: torch.dtype) -> Target:
    return Target(tiny_model().to("cuda", dtype), tiny_tokenizer(), TINY_FEATURE_LAYERS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_speculative_decoding_on_cuda_equals_plain_greedy(dtype, kind):
    target = cuda_target(dtype)
    cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=[])
    plain = [generate(target, p, None, cfg) for p in PROMPTS]
    drafter = PartlyRightDrafter(make_drafter(target, kind, 6).to("cuda"), plain)
    for prompt, reference in zip(PROMPTS, plain):
        spec = generate(target, prompt, drafter, cfg)
        assert spec.tokens == reference.tokens
        assert any(s.accept_len > 0 for s in spec.steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_rollouts_on_cuda_equal_plain_greedy(dtype):
    target = cuda_target(dtype)
    cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=[])
    plain = [generate(target, p, None, cfg) for p in PROMPTS]
    drafter = PartlyRightDrafter(make_drafter(target, "dflash", 6).to("cuda"), plain)
    batched = dict(generate_batch(target, [(p, i) for i, p in enumerate(PROMPTS)], drafter, cfg, batch_size=2))
    assert [batched[i].tokens for i in range(len(PROMPTS))] == [r.tokens for r in plain]
