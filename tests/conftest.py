"""Shared fixtures. Tests run on CPU in fp32 with real components: the embedded SmolLM2 or tiny random llamas."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Two cores, several processes (torchrun tests): spinning OpenMP threads starve each other without this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Property tests draw the same examples on every run, so a CI verdict depends on the code alone, never on the
# draw. HYPOTHESIS_PROFILE=explore draws fresh examples (and replays saved failures) to hunt for new ones.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default SmolLM2-135M-Instruct, fp32, eval mode. Do not mutate it."""
    from grpo.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from grpo.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
