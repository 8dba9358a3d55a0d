import pytest

from engines.artifacts import load_model
from engines.config import EngineConfig
from engines.registry import create_engine


@pytest.fixture(scope="session")
def engine(artifact_dir):
    """float32: the dtype whose greedy output must equal transformers' token for token."""
    eng = create_engine(EngineConfig(model=artifact_dir, dtype="float32", num_threads=2, prefix_cache_tokens=0))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf(artifact_dir):
    model, tokenizer, _ = load_model(artifact_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def engine_bf16(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, dtype="bfloat16", num_threads=2, prefix_cache_tokens=0))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_bf16(artifact_dir):
    model, tokenizer, _ = load_model(artifact_dir, dtype="bfloat16")
    return model, tokenizer


# decode_mode static on CPU: the GPU replicas' fixed-shape decode path (KV cache preallocated once,
# padded batch buckets, device-side length mask), run eagerly. Short sequences keep the cache small.
STATIC_CONFIG = dict(dtype="float32", num_threads=2, prefix_cache_tokens=0, decode_mode="static", max_seq_len=512,
                     max_running_seqs=8, cuda_graph_batch_sizes=(1, 2, 4, 8))


@pytest.fixture(scope="session")
def engine_static(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, **STATIC_CONFIG))
    eng.start()
    yield eng
    eng.shutdown()
