import pytest

from engines.artifacts import load_model
from engines.config import EngineConfig
from engines.registry import create_engine


@pytest.fixture(scope="session")
def engine(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, num_threads=2, prefix_cache_tokens=0))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf(artifact_dir):
    model, tokenizer, _ = load_model(artifact_dir)
    return model, tokenizer
