"""Trust that remembers (toolkit.bundle.trust): a bundle the user made, or vouched for with
`toolkit trust`, has its PyTorch source rebuilt without --trust-source, while it stays where it is
and names the same, unchanged code; a copy, another source or changed code is refused again, and
the refusal names the command that grants trust."""

from __future__ import annotations

import json
import shutil

import pytest

from toolkit.bundle import Bundle, Source
from toolkit.bundle.trust import remember, trusted
from toolkit.compile import check
from toolkit.compile.exporter import export
from toolkit.errors import ToolkitError


@pytest.mark.slow  # an export of its own: what export remembers is the point
def test_a_bundle_the_user_exported_is_checked_without_trust_source(tmp_path, cli, trust_file):
    bundle = export("userpkg.toy:build", tmp_path / "mine").path
    assert check(bundle, variants=["fp32"])["fp32"]["passed"]  # no trust_source: export remembered it
    shown = cli("check", bundle)
    assert shown.exit_code == 0, shown.output
    assert str(bundle.resolve()) in json.loads(trust_file.read_text())["bundles"]
    assert oct(trust_file.stat().st_mode & 0o777) == "0o600"


def test_a_copy_is_refused_naming_the_command_that_grants_trust_until_trusted(exported, tmp_path, cli):
    copy = tmp_path / "copy"
    shutil.copytree(exported("userpkg.toy:build"), copy)
    refused = cli("check", copy)
    assert refused.exit_code == 2 and f"run `toolkit trust {copy}`" in refused.output, refused.output
    assert cli("trust", copy).exit_code == 0
    assert cli("check", copy).exit_code == 0
    listed = cli("trust", "--list")
    assert f"{copy.resolve()}: userpkg.toy:build (trusted)" in listed.output
    assert "no longer trusted" in cli("trust", copy, "--revoke").output
    assert cli("check", copy).exit_code == 2


def test_another_source_or_changed_code_is_untrusted_again(exported, tmp_path, monkeypatch):
    package = tmp_path / "code" / "vouched"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from userpkg.toy import build\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    copy = tmp_path / "copy"
    shutil.copytree(exported("userpkg.toy:build"), copy)
    bundle = Bundle.open(copy)
    bundle.update(lambda manifest: setattr(manifest, "source", Source("factory", ref="vouched.models:build")))
    remember(Bundle.open(copy))
    assert trusted(Bundle.open(copy))
    (package / "models.py").write_text("from userpkg.toy import build  # changed\n")
    assert not trusted(Bundle.open(copy))  # the code it names changed
    remember(Bundle.open(copy))
    Bundle.open(copy).update(lambda manifest: setattr(manifest, "source", Source("factory", ref="userpkg.toy:baked")))
    with pytest.raises(ToolkitError, match="toolkit trust"):  # the manifest names other code
        check(copy, variants=["fp32"])
