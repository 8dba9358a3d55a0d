import pytest

from engines.artifacts import DEFAULT_ARTIFACT_DIR


@pytest.fixture(scope="session")
def artifact_dir() -> str:
    if not (DEFAULT_ARTIFACT_DIR / "manifest.json").exists():
        pytest.fail("default artifact missing: run `make setup` (python -m engines.build)")
    return str(DEFAULT_ARTIFACT_DIR)
