"""The manifest's records: where a model came from (`Source`) and the names bundles get."""

import pytest

from toolkit.bundle import Source, safe_name
from toolkit.errors import ToolkitError


@pytest.mark.parametrize(("source", "name"), [
    (Source("zoo", model="gpt", preset="tiny"), "gpt"),
    (Source("factory", ref="userpkg.toy:build"), "toy"),
    (Source("factory", ref="my_pkg.zoo:resnet_small"), "resnet_small"),
    (Source("hf", path="/models/all-MiniLM-L6-v2"), "all-MiniLM-L6-v2"),
    (Source("hf", path="/models/minilm/model"), "minilm"),
    (Source("zoo", model="seq2seq", preset="default", part="encoder"), "seq2seq-encoder"),
])
def test_default_names_say_what_the_model_is_and_are_safe_in_urls(source, name):
    assert source.default_name() == name == safe_name(name)


def test_a_source_round_trips_through_json_and_is_described():
    source = Source("factory", ref="userpkg.toy:build").with_part("encoder")
    assert source.to_json() == {"kind": "factory", "ref": "userpkg.toy:build", "part": "encoder"}
    assert Source.from_json(source.to_json()) == source
    assert source.describe() == "userpkg.toy:build, part encoder" and source.with_part(None).describe() == "userpkg.toy:build"


def test_a_source_missing_what_its_kind_needs_is_refused():
    with pytest.raises(ToolkitError, match="a factory source needs ref"):
        Source("factory")
    with pytest.raises(ToolkitError, match="unknown model source kind 'hub'"):
        Source("hub", path="x")


def test_unsafe_names_are_made_safe():
    assert safe_name("toy:build") == "toy-build" and safe_name("../x y") == "x-y" and safe_name("::") == "model"


def test_export_refuses_an_unsafe_name_before_any_work(tmp_path):
    from toolkit.compile import export

    with pytest.raises(ToolkitError, match=r"--name 'my model/v1': use letters, digits, '_', '.' and '-' only .* 'my-model-v1'"):
        export("mlp", tmp_path / "b", preset="tiny", name="my model/v1")
    assert not (tmp_path / "b").exists()
