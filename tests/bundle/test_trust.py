"""Bundles are data from elsewhere: crafted ones are refused by load, serve and package, each with a
message naming the problem, before anything outside the bundle is read, written or deleted; signed
bundles verify and any one-byte change fails naming the file; concurrent writers all land; a
bundle's factory source is not run without --trust-source."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

import toolkit
from toolkit.bundle import Bundle, sha256_file
from toolkit.errors import ToolkitError

OUTSIDE = "outside.onnx"  # the attacker's file beside the bundle (its sha256 in the manifest matches)
SECRET = "secret.bin"  # a file outside the bundle that a crafted graph points its external data at


def _manifest(bundle: Path, change: Callable[[dict], object]) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def _fp32(data: dict) -> dict:
    return data["variants"]["fp32"]


def _points_outside(file: Callable[[Path], str]) -> Callable[[Path], None]:
    def craft(bundle: Path) -> None:
        shutil.copyfile(bundle / "model.fp32.onnx", bundle.parent / OUTSIDE)
        _manifest(bundle, lambda data: _fp32(data).__setitem__("file", file(bundle)))
    return craft


def _linked(link: Callable[[Path, Path], None]) -> Callable[[Path], None]:
    def craft(bundle: Path) -> None:
        shutil.copyfile(bundle / "model.fp32.onnx", bundle.parent / OUTSIDE)
        (bundle / "model.fp32.onnx").unlink()
        link(bundle.parent / OUTSIDE, bundle / "model.fp32.onnx")
    return craft


def _external_data_outside(bundle: Path) -> None:
    """The graph's weights moved to ../secret.bin, the manifest's sha256 of the graph updated to match."""
    graph = onnx.load(str(bundle / "model.fp32.onnx"))
    tensor = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    (bundle.parent / SECRET).write_bytes(tensor.raw_data)
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", f"../{SECRET}"), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    (bundle / "model.fp32.onnx").write_bytes(graph.SerializeToString())
    _manifest(bundle, lambda data: _fp32(data).update(sha256=sha256_file(bundle / "model.fp32.onnx")))


def _lock_file(bundle: Path) -> Path:
    """The bundle's lock file, removed: a link to the victim takes its name (the lock is opened for writing)."""
    (bundle / ".toolkit.lock").unlink(missing_ok=True)
    return bundle / ".toolkit.lock"


def _flip_byte(bundle: Path) -> None:
    with open(bundle / "model.fp32.onnx", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        byte = f.read(1)
        f.seek(-64, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))


def _swapped_manifest(other: Path) -> Callable[[Path], None]:
    return lambda bundle: shutil.copyfile(other / "manifest.json", bundle / "manifest.json")


# name → (craft(bundle), what the refusal says)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "traversal": (_points_outside(lambda b: f"../{OUTSIDE}"), r"variants\.fp32\.file must be a plain file name inside the bundle"),
    "nested traversal": (_points_outside(lambda b: f"a/../../{OUTSIDE}"), r"variants\.fp32\.file must be a plain file name"),
    "absolute path": (_points_outside(lambda b: str(b.parent / OUTSIDE)), r"variants\.fp32\.file must be a plain file name"),
    "symlink": (_linked(lambda target, link: link.symlink_to(target)), r"model\.fp32\.onnx is a symbolic link"),
    "hardlink": (_linked(lambda target, link: os.link(target, link)), r"model\.fp32\.onnx is a hard link \(2 names"),
    "external data outside": (_external_data_outside, r"reads external data from '\.\./secret\.bin', which the manifest does not list"),
    "listed external data outside": (lambda b: _manifest(b, lambda d: _fp32(d).__setitem__(
        "external_data", [{"file": f"../{SECRET}", "sha256": "0" * 64, "bytes": 1}])), r"external_data\[0\]\.file must be a plain file name"),
    "unlisted file": (lambda b: (b / "notes.bin").write_bytes(b"\0" * 8), r"notes\.bin is not listed in its manifest"),
    "flipped byte": (_flip_byte, r"model\.fp32\.onnx \(variant 'fp32'\) fails its sha256 check"),
    "part outside": (lambda b: _manifest(b, lambda d: d.__setitem__("parts", ["../other"])), r"parts\[0\] must be a safe name"),
    "victim name": (lambda b: _manifest(b, lambda d: d.__setitem__("name", "../victim")), r"field name must be a safe name .* got string '\.\./victim'"),
    "non-JSON manifest": (lambda b: (b / "manifest.json").write_bytes(b"\x89PNG not json"), r"is not a valid manifest: it is not JSON"),
    "array manifest": (lambda b: (b / "manifest.json").write_text("[]"), r"holds a JSON array, not an object"),
    "wrong-typed sha256": (lambda b: _manifest(b, lambda d: _fp32(d).__setitem__("sha256", 12)), r"variants\.fp32\.sha256 must be a sha256 .* got number 12"),
    "asset outside": (lambda b: _manifest(b, lambda d: d.__setitem__("assets", {"../tokenizer.json": {"sha256": "0" * 64, "bytes": 1}})),
                      r"assets key must be a plain file name"),
    "lock symlink": (lambda b: _lock_file(b).symlink_to(b.parent / "victim" / "keep.txt"), r"\.toolkit\.lock is a link or not a regular file"),
    "lock hardlink": (lambda b: os.link(b.parent / "victim" / "keep.txt", _lock_file(b)), r"\.toolkit\.lock is a link or not a regular file"),
    "encoder not a part": (lambda b: _manifest(b, lambda d: d.__setitem__("generation", {"encoder": "../enc", "eos_token_id": 0, "context": 8})),
                           r"field generation\.encoder must be a safe name"),
}


@pytest.fixture
def crafted(exported, tmp_path):
    """crafted(name) → a bundle of the corpus in tmp_path/home/, with a victim directory and the
    outside files beside it; the list of paths whose reading the test watches."""

    def make(name: str) -> Path:
        home = tmp_path / "home"
        home.mkdir()
        bundle = home / "bundle"
        shutil.copytree(exported("mlp"), bundle)
        (home / "victim").mkdir()
        (home / "victim" / "keep.txt").write_text("precious")
        if name == "swapped manifest":
            _swapped_manifest(exported("cnn"))(bundle)
        else:
            CORPUS[name][0](bundle)
        return bundle

    return make


@pytest.fixture
def outside_reads(tmp_path):
    """The files outside tmp_path/home/bundle that Python code opens during the test (an audit hook)."""
    opened: list[str] = []
    home = str(tmp_path / "home")
    watching = [True]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(home) and not path.startswith(os.path.join(home, "bundle") + os.sep) and "victim" not in path:
                opened.append(path)

    sys.addaudithook(hook)  # hooks cannot be removed: this one stops watching when the test ends
    yield opened
    watching[0] = False


ALL = [*CORPUS, "swapped manifest"]
EXPECTED = {**{name: pattern for name, (_, pattern) in CORPUS.items()}, "swapped manifest": r"model\.fp32\.onnx \(variant 'fp32'\) fails its sha256 check"}


@pytest.mark.parametrize("name", ALL)
def test_load_refuses_a_crafted_bundle_saying_why_before_onnxruntime_opens_it(name, crafted, outside_reads, monkeypatch):
    bundle = crafted(name)
    outside_reads.clear()  # crafting wrote the outside files
    monkeypatch.setattr("toolkit.runtime.model.open_session", lambda *a, **k: pytest.fail("onnxruntime opened a crafted bundle"))
    with pytest.raises(ToolkitError, match=EXPECTED[name]):
        toolkit.load(bundle, provider="cpu")
    assert outside_reads == []


@pytest.mark.parametrize("name", ALL)
def test_serve_and_package_refuse_a_crafted_bundle_and_touch_nothing_outside(name, crafted, outside_reads, cli, tmp_path):
    bundle = crafted(name)
    outside_reads.clear()
    served = cli("serve", bundle, "--port", "0")
    assert served.exit_code == 2, served.output
    assert re.search(EXPECTED[name], _one_line(served.stderr)), served.output
    repo = tmp_path / "home" / "repo"
    repo.mkdir()
    packaged = cli("package", bundle, "--triton", repo, "--force")
    assert packaged.exit_code == 2 and re.search(EXPECTED[name], _one_line(packaged.stderr)), packaged.output
    assert list(repo.iterdir()) == [] and (tmp_path / "home" / "victim" / "keep.txt").read_text() == "precious"
    assert outside_reads == []


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_clean_bundle_opens_and_a_writers_staging_entries_are_ignored(exported, copy_of):
    bundle = copy_of(exported("mlp"))
    (bundle / ".model.int8.onnx.tmp-abc123").mkdir()  # a quantization still writing, or interrupted
    (bundle / ".manifest.json.x1y2.tmp").write_bytes(b"{")
    assert toolkit.load(bundle, provider="cpu").name == "mlp"


# --- signing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private PEM, public PEM, another public PEM): EC P-256 keys made here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("signer", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        (root / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (root / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        paths.append(root / name)
    return paths[0].with_suffix(".pem"), paths[0].with_suffix(".pub"), paths[1].with_suffix(".pub")


@pytest.fixture
def signed(exported, copy_of, keys, cli):
    bundle = copy_of(exported("seq2seq"))  # a part: the signature covers the subdirectory too
    result = cli("sign", bundle, "--key", keys[0])
    assert result.exit_code == 0, result.output
    return bundle


def test_a_signed_bundle_verifies_and_loads_with_its_key(signed, keys, cli):
    result = cli("verify", signed, "--pub", keys[1])
    assert result.exit_code == 0 and "signature verified" in result.output, result.output
    assert toolkit.load(signed, provider="cpu", verify=keys[1]).name == "seq2seq"


def test_any_one_byte_change_fails_verification_naming_the_file(signed, keys, cli):
    from toolkit.bundle.signing import verify

    files = sorted(p for p in signed.rglob("*") if p.is_file() and p.name not in ("model.sig", ".toolkit.lock"))
    assert {"manifest.json", "model.fp32.onnx", "encoder/manifest.json", "encoder/model.fp32.onnx"} <= {p.relative_to(signed).as_posix() for p in files}
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ToolkitError, match=rf"fails signature verification: {path.relative_to(signed).as_posix()} changed since it was signed"):
            verify(signed, keys[1])
        path.write_bytes(original)
    verify(signed, keys[1])  # all restored


def test_an_unsigned_added_or_foreign_signed_bundle_is_refused(signed, keys, cli, exported, copy_of):
    result = cli("verify", signed, "--pub", keys[2])
    assert result.exit_code == 1 and "signed with another key" in _one_line(result.stderr), result.output
    (signed / "encoder" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ToolkitError, match=r"not signed \(added since\): encoder/extra\.bin"):
        toolkit.load(signed, provider="cpu", verify=keys[1])
    unsigned = copy_of(exported("mlp"))
    with pytest.raises(ToolkitError, match=r"is not signed \(no model\.sig\); sign it with `toolkit sign"):
        toolkit.load(unsigned, provider="cpu", verify=keys[1])
    served = cli("serve", unsigned, "--port", "0", "--verify", keys[1])
    assert served.exit_code == 1 and "is not signed" in served.stderr  # a check failed, as for verify


def test_signing_refuses_a_bundle_that_is_already_damaged(exported, copy_of, keys, cli):
    bundle = copy_of(exported("mlp"))
    _flip_byte(bundle)
    result = cli("sign", bundle, "--key", keys[0])
    assert result.exit_code == 2 and "fails its sha256 check" in result.stderr and not (bundle / "model.sig").exists()


# --- concurrent writers ----------------------------------------------------------------------------

_ADD_VARIANTS = """
import sys
from pathlib import Path
from toolkit.bundle import Bundle
bundle = Bundle.open(sys.argv[1])
for i in range(int(sys.argv[3])):
    bundle.add_variant(f"{sys.argv[2]}{i}", Path(sys.argv[1]) / "model.fp32.onnx", recipe={"stage": "test"}, precision="fp32")
"""


def test_concurrent_writers_all_land(exported, copy_of):
    bundle = copy_of(exported("mlp"))
    writers = [subprocess.Popen([sys.executable, "-c", _ADD_VARIANTS, str(bundle), prefix, "8"]) for prefix in ("a", "b", "c")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    opened = Bundle.open(bundle)  # every file listed: no variant lost, no orphan file
    assert set(opened.manifest.variants) == {"fp32"} | {f"{p}{i}" for p in "abc" for i in range(8)}
    for name in opened.manifest.variants:
        opened.variant_path(name)


@pytest.mark.slow
def test_two_concurrent_quantize_runs_on_one_bundle_both_land(exported, copy_of):
    bundle = copy_of(exported("mlp"))
    runs = [subprocess.Popen([sys.executable, "-m", "toolkit.cli", "quantize", str(bundle), "--mode", mode, "--no-check"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for mode in ("int8", "fp16")]
    outputs = [r.communicate(timeout=300)[0].decode() for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    assert set(Bundle.open(bundle).manifest.variants) == {"fp32", "int8", "fp16"}


def test_a_replaced_directory_is_never_missing(tmp_path, monkeypatch):
    from toolkit.bundle import store

    target, staging = tmp_path / "target", tmp_path / "staging"
    for path, text in ((target, "old"), (staging, "new")):
        path.mkdir()
        (path / "f").write_text(text)
    assert store._exchange(staging, target)  # the atomic exchange exists here (Linux)
    store._exchange(staging, target)  # back
    store.replace_directory(staging, target)
    assert (target / "f").read_text() == "new" and not staging.exists()
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)  # where there is no exchange: two renames
    staging.mkdir()
    (staging / "f").write_text("newer")
    store.replace_directory(staging, target)
    assert (target / "f").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["target"]


# --- the source a bundle names ---------------------------------------------------------------------


def test_check_refuses_a_factory_source_without_trust_source(cli, exported, copy_of):
    bundle = copy_of(exported("userpkg.toy:build"))
    refused = cli("check", bundle)
    assert refused.exit_code == 2, refused.output
    assert "names its PyTorch reference userpkg.toy:build; rebuilding it imports and calls that code" in _one_line(refused.stderr)
    assert "--trust-source" in refused.stderr and Bundle.open(bundle).manifest.variants["fp32"].parity is None
    trusted = cli("check", bundle, "--trust-source")
    assert trusted.exit_code == 0, trusted.output
    refused = cli("quantize", bundle, "--mode", "int8")
    assert refused.exit_code == 2 and "--trust-source" in refused.stderr and "int8" not in Bundle.open(bundle).manifest.variants
