"""Hugging Face hub ids (`hf:org/name[@revision]`), resolved through the Hugging Face cache, offline
here from a cache the test populates as huggingface_hub lays it out: the snapshot's commit and its
files' sha256 recorded in the manifest; a model that runs its own code refused unless the user lets
it, and that say-so recorded."""

from __future__ import annotations

import json
import shutil

import pytest

from models.hf_heads import hf_model
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError

pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
COMMIT, OTHER = "1" * 40, "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding toolkit-tests/tiny-bert at two commits (main → the second, tag v1
    → the first), and the hub out of reach."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--toolkit-tests--tiny-bert"
    for commit in (COMMIT, OTHER):
        shutil.copytree(hf_model("bert-sequence"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(OTHER)
    (repo / "refs" / "v1").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


@pytest.mark.slow  # exports the BERT anew (the suite's cached bundles are keyed by model, not by where it came from)
def test_a_hub_id_exports_from_the_cache_with_its_commit_and_file_hashes_recorded(hub, tmp_path, cli):
    from toolkit.reference.source import source_of

    result = cli("export", "hf:toolkit-tests/tiny-bert", "-o", tmp_path / "bundle")
    assert result.exit_code == 0, result.output
    manifest = Bundle.open(tmp_path / "bundle").manifest
    assert (manifest.source.hub, manifest.source.revision) == ("toolkit-tests/tiny-bert", OTHER)  # main
    assert manifest.source.path == str(hub / "snapshots" / OTHER) and manifest.name == "tiny-bert"
    snapshot = manifest.reference["snapshot"]
    assert snapshot["revision"] == OTHER and set(snapshot["files"]) >= {"config.json", "model.safetensors"}
    checked = cli("check", tmp_path / "bundle")  # rebuilt from the snapshot, trusted as the user made it
    assert checked.exit_code == 0, checked.output
    for revision in ("v1", COMMIT):  # a tag, a commit
        assert source_of(f"hf:toolkit-tests/tiny-bert@{revision}", None).revision == COMMIT


def test_a_hub_id_not_in_the_cache_offline_says_where_it_looked(hub, tmp_path, cli):
    result = cli("export", "hf:toolkit-tests/absent", "-o", tmp_path / "bundle")
    assert result.exit_code == 2 and "not in the Hugging Face cache" in result.output and "HF_HUB_OFFLINE is set" in result.output
    assert not (tmp_path / "bundle").exists()


def test_a_model_with_its_own_code_runs_only_when_the_user_lets_it(tmp_path, cli):
    from toolkit.reference.hf import hf_spec
    from toolkit.reference.source import source_of

    model = tmp_path / "custom"
    shutil.copytree(hf_model("bert-sequence"), model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomBert"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("from transformers import BertForSequenceClassification\n\n\n"
                                              "class CustomBert(BertForSequenceClassification):\n    pass\n")
    refused = cli("export", f"hf:{model}", "-o", tmp_path / "refused")
    assert refused.exit_code == 2 and "--trust-remote-code" in refused.output and "modeling_custom.CustomBert" in refused.output
    with pytest.raises(ToolkitError, match="--trust-remote-code applies to Hugging Face models"):
        source_of("mlp", None, trust_remote_code=True)
    source = source_of(f"hf:{model}", None, trust_remote_code=True)
    assert source.to_json()["remote_code"] is True and "with its own code" in source.describe()  # what the manifest records
    assert type(hf_spec(model, trust_remote_code=True).module.model).__module__.endswith("modeling_custom")
