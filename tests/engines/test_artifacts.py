import json
from pathlib import Path

import pytest
import torch

from engines import build
from engines.artifacts import artifact_is_current, default_gguf_path, load_model, resolve_model


def test_default_artifact_manifest_describes_its_source(artifact_dir):
    target = resolve_model(artifact_dir)
    manifest = target.manifest
    assert target.gguf_file is None
    assert manifest["engine"] == "torch" and manifest["dtype"] == "float32"
    assert manifest["source_hash"].startswith("sha256:")
    assert artifact_is_current(Path(artifact_dir), str(default_gguf_path()), "float32")


def test_artifact_gives_identical_logits_to_the_gguf_source(artifact_dir):
    """Round trip: the safetensors artifact is the de-quantized GGUF model, bit for bit."""
    gguf = str(default_gguf_path())
    source, tokenizer, _ = load_model(gguf)
    artifact, artifact_tokenizer, _ = load_model(artifact_dir)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    assert ids.tolist() == artifact_tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        assert torch.equal(source(ids).logits, artifact(ids).logits)
    assert tokenizer.chat_template == artifact_tokenizer.chat_template


def test_build_is_idempotent_and_rebuilds_on_dtype_change(tmp_path, artifact_dir, capsys):
    out = tmp_path / "art"
    # Seed from the existing artifact (fast) instead of the 20 s GGUF conversion.
    assert build.main(["--source", artifact_dir, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == artifact_dir
    assert build.main(["--source", artifact_dir, "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert not artifact_is_current(out, artifact_dir, "bfloat16")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
