from __future__ import annotations

import pytest

from workers.methods import MethodContext
from workers.models import family_for

CALIBRATION = ["Calibration text about attention heads and layers. " * 8,
               "A second calibration document, with different words in it. " * 8]


@pytest.fixture
def context(random_llama, byte_tokenizer):
    return MethodContext(tokenizer=byte_tokenizer, family=family_for(random_llama), seed=0,
                         device="cpu", calibration_documents=lambda name, split, seed: CALIBRATION)
