"""Encrypted bundles: sealed for each kind of recipient, opened in memory only (an audit hook sees
every file the process writes), every kind of tampering a clear error naming the file, the
signature checked before anything is decrypted, and the CLI's round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import toolkit
from models.hf_causal import causal_lm
from tests.secrets_kit import files_written, key_pair, signing_pair
from toolkit.bundle import Bundle
from toolkit.bundle.encryption import MAGIC, decrypt, encrypt
from toolkit.bundle.validate import LOCK_NAME
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.runtime.generate import Generator
from toolkit.runtime.samples import make_feeds


def _feeds(model):
    return make_feeds(model.inputs, {d.name: d.check[0] for d in model.bundle.manifest.dims}, 0)


def _only_locks(written):
    return [path for path in written if not path.endswith(LOCK_NAME)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    return {kind: key_pair(directory, kind) for kind in ("x25519", "rsa", "key-file")}


@pytest.mark.parametrize("kind", ["x25519", "rsa", "key-file"])
def test_a_sealed_bundle_runs_exactly_as_the_plain_one(exported, tmp_path, keys, kind):
    plain = exported("mlp")
    secret, recipient = keys[kind]
    sealed = encrypt(plain, recipients=[recipient], out=tmp_path / "sealed")
    manifest = json.loads((sealed / "manifest.json").read_text())
    assert manifest["encryption"]["recipients"][0]["kind"] == {"rsa": "rsa-oaep-sha256"}.get(kind, kind)
    weights = (plain / "model.fp32.onnx").read_bytes()
    ciphertext = (sealed / "model.fp32.onnx").read_bytes()
    assert ciphertext.startswith(MAGIC) and weights[len(weights) // 2: len(weights) // 2 + 64] not in ciphertext
    with files_written() as written:
        model = toolkit.load(sealed, key=secret, provider="cpu")
        feeds = _feeds(model)
        got = model.run(feeds)
    assert _only_locks(written) == []
    want = toolkit.load(plain, provider="cpu").run(feeds)
    assert all(np.array_equal(got[name], want[name]) for name in want)


def test_any_recipient_opens_it_and_nobody_else(exported, tmp_path, keys):
    sealed = encrypt(exported("mlp"), recipients=[keys["x25519"][1], keys["key-file"][1]], out=tmp_path / "sealed")
    for secret in (keys["x25519"][0], keys["key-file"][0]):
        toolkit.load(sealed, key=secret, provider="cpu")
    with pytest.raises(ToolkitError, match=r"is not sealed for key .*rsa\.pem.*it is sealed for: x25519 [0-9a-f]{16}, key-file"):
        toolkit.load(sealed, key=keys["rsa"][0])
    with pytest.raises(ToolkitError, match="is encrypted; give its key"):
        toolkit.load(sealed)
    with pytest.raises(ToolkitError, match="a public key cannot open a bundle"):
        toolkit.load(sealed, key=keys["x25519"][1])


@pytest.fixture(scope="module")
def sealed_llama(with_variants, tmp_path_factory, keys):
    """The tiny Hugging Face LLaMA with its fused variant (the in-place cache's graph) and tokenizer,
    its weights moved beside the graph by sealing."""
    plain = with_variants(f"hf:{causal_lm('llama')}", ("opt",))
    return plain, encrypt(plain, recipients=[keys["x25519"][1]], out=tmp_path_factory.mktemp("llama") / "sealed")


@pytest.mark.xdist_group("sealed-llama")  # one worker optimizes and seals the LLaMA, for both tests that read it
def test_a_sealed_decoder_generates_as_the_plain_one_with_nothing_decrypted_on_disk(sealed_llama, keys):
    plain, sealed = sealed_llama
    assert Bundle.open(sealed).manifest.variants["opt"].external_data, "the weights are sealed beside the graph"
    with files_written() as written:
        generator = Generator(sealed, variant="opt", provider="cpu", key=keys["x25519"][0])
        assert generator.decode == "inplace", generator.note  # the graph rewritten for the in-place cache, in memory
        got = generator.generate("The quick brown fox", max_new_tokens=12)
    assert _only_locks(written) == []
    want = Generator(plain, variant="opt", provider="cpu").generate("The quick brown fox", max_new_tokens=12)
    assert got == want


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.xdist_group("sealed-llama")
@pytest.mark.parametrize("damage", ["flipped", "truncated", "swapped", "not-sealed"])
def test_a_damaged_sealed_file_is_refused_by_name(sealed_llama, copy_of, keys, damage):
    sealed = copy_of(sealed_llama[1])
    data = sealed / "model.opt.onnx.data"
    size = data.stat().st_size
    if damage == "flipped":
        _flip(data, size // 2)
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[: size - 100])
    elif damage == "swapped":
        shutil.copyfile(sealed / "model.fp32.onnx.data", data)
    else:
        data.write_bytes(b"\0" * size)
    with pytest.raises(ToolkitError, match=r"model\.opt\.onnx\.data (fails its authentication|is truncated|is not a sealed file)"):
        toolkit.load(sealed, variant="opt", key=keys["x25519"][0], provider="cpu")


@pytest.mark.parametrize("damage", ["last-chunk-dropped", "chunks-reordered", "renamed"])
def test_chunks_cannot_be_dropped_reordered_or_moved(tmp_path, damage):
    from toolkit.bundle.encryption import CHUNK_BYTES, open_sealed, seal_file

    plain = tmp_path / "weights"
    plain.write_bytes(np.random.default_rng(0).bytes(2 * CHUNK_BYTES + 1000))
    key = bytes(range(32))
    seal_file(plain, tmp_path / "sealed", key, "m/weights")
    digest = __import__("hashlib").sha256(plain.read_bytes()).hexdigest()
    assert open_sealed(tmp_path / "sealed", key, "m/weights", digest, "here").tobytes() == plain.read_bytes()
    data, head, chunk = (tmp_path / "sealed").read_bytes(), len(MAGIC) + 7, CHUNK_BYTES + 16
    label = "m/weights"
    if damage == "last-chunk-dropped":  # a cut at a chunk's end: only the last chunk's flag tells
        data = data[: head + 2 * chunk]
    elif damage == "chunks-reordered":
        data = data[:head] + data[head + chunk: head + 2 * chunk] + data[head: head + chunk] + data[head + 2 * chunk:]
    else:
        label = "m/other"
    (tmp_path / "sealed").write_bytes(data)
    with pytest.raises(ToolkitError, match="sealed fails its authentication at byte"):
        open_sealed(tmp_path / "sealed", key, label, digest, "here")


def test_the_signature_is_checked_before_anything_is_decrypted(sealed_llama, copy_of, keys, tmp_path, monkeypatch):
    import toolkit.bundle.encryption as encryption
    from toolkit.bundle.signing import sign

    sealed = copy_of(sealed_llama[1])
    signing_key, public = signing_pair(tmp_path)
    sign(sealed, signing_key)  # without the bundle's key: the sealed files' own sha256 are checked
    toolkit.load(sealed, variant="opt", verify=public, key=keys["x25519"][0], provider="cpu")
    _flip(sealed / "tokenizer.json", 40)
    opened = []
    monkeypatch.setattr(encryption, "open_sealed", lambda *a, **k: opened.append(a) or pytest.fail("decrypted before verifying"))
    with pytest.raises(CheckFailed, match="tokenizer.json changed since it was signed"):
        toolkit.load(sealed, variant="opt", verify=public, key=keys["x25519"][0], provider="cpu")
    assert opened == []


def test_what_needs_plain_graphs_says_how_to_decrypt(exported, tmp_path, keys):
    from toolkit.compile.optimizer import optimize

    sealed = encrypt(exported("mlp"), recipients=[keys["x25519"][1]], out=tmp_path / "sealed")
    with pytest.raises(ToolkitError, match=r"is encrypted; this command needs its graphs in the clear: `toolkit decrypt"):
        optimize(sealed)


def test_an_encoder_decoder_seals_its_parts_under_the_same_key(exported, tmp_path, keys):
    plain = exported("seq2seq")
    sealed = encrypt(plain, recipients=[keys["key-file"][1]], out=tmp_path / "sealed")
    part = Bundle.open(sealed).manifest.parts[0]
    assert json.loads((sealed / part / "manifest.json").read_text())["encryption"]["files"]
    got = Generator(sealed, provider="cpu", key=keys["key-file"][0]).generate("abc", max_new_tokens=6)
    assert got == Generator(plain, provider="cpu").generate("abc", max_new_tokens=6)


def test_encrypt_run_decrypt_round_trip_on_the_command_line(exported, tmp_path, keys, cli):
    plain = shutil.copytree(exported("mlp"), tmp_path / "mlp")
    secret, public = keys["x25519"]
    result = cli("encrypt", plain, "--recipient", public)
    assert result.exit_code == 0, result.output
    assert "disk blocks" in result.output and Bundle.open(plain).sealed
    assert cli("run", plain, "--example").exit_code == 2
    result = cli("run", plain, "--example", "--key", secret)
    assert result.exit_code == 0 and "output logits" in result.output, result.output
    result = cli("check", plain)
    assert result.exit_code == 2 and "toolkit decrypt" in result.output
    result = cli("decrypt", plain, "--key", secret, "-o", tmp_path / "clear")
    assert result.exit_code == 0, result.output
    clear, original = toolkit.load(tmp_path / "clear", provider="cpu"), toolkit.load(exported("mlp"), provider="cpu")
    assert np.array_equal(clear(*_feeds(clear).values()), original(*_feeds(original).values()))
    assert cli("check", tmp_path / "clear").exit_code == 0


def test_package_decrypts_straight_into_the_triton_repository(exported, tmp_path, keys):
    import onnxruntime as ort

    from toolkit.serve.triton import package_triton

    plain = exported("mlp")
    sealed = encrypt(plain, recipients=[keys["rsa"][1]], out=tmp_path / "sealed")
    with files_written() as written:
        target = package_triton(sealed, tmp_path / "repo", key=keys["rsa"][0])
    model = toolkit.load(plain, provider="cpu")
    feeds = _feeds(model)
    packaged = ort.InferenceSession(str(target / "1" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(packaged[0], model.run(feeds)[model.outputs[0].name])
    assert all(str(tmp_path / "repo") in path for path in _only_locks(written)), written  # only the repository it was asked for


def test_bench_times_a_sealed_bundle_with_nothing_decrypted_on_disk(exported, tmp_path, keys):
    from toolkit.bench.compare import bench

    sealed = encrypt(exported("mlp"), recipients=[keys["x25519"][1]], out=tmp_path / "sealed")
    with files_written() as written:
        report = bench(Bundle.open(sealed, key=keys["x25519"][0]), torch_eager=False, max_time=0.05, rounds=1, warmup=1, threads=1)
    assert [row.variant for row in report.rows] == ["fp32"] and _only_locks(written) == []


def test_sealing_keeps_the_source_bundle_until_the_sealed_one_is_complete(exported, copy_of, keys, monkeypatch):
    import toolkit.bundle.encryption as encryption

    plain = copy_of(exported("mlp"))
    before = {p.name: p.read_bytes() for p in plain.iterdir() if p.is_file() and p.name != LOCK_NAME}
    monkeypatch.setattr(encryption, "seal_file", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        encrypt(plain, recipients=[keys["x25519"][1]])
    assert {p.name: p.read_bytes() for p in plain.iterdir() if p.is_file() and p.name != LOCK_NAME} == before
    monkeypatch.undo()
    with pytest.raises(ToolkitError, match="already encrypted"):
        encrypt(encrypt(plain, recipients=[keys["x25519"][1]], out=plain.parent / "s"), recipients=[keys["x25519"][1]])
    with pytest.raises(ToolkitError, match="is not encrypted"):
        decrypt(plain, key=keys["x25519"][0])
