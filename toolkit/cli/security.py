"""What keeps a bundle and a server private and authentic: `toolkit encrypt` / `decrypt` (a bundle
sealed at rest), `toolkit sign` / `verify` (who made it, unchanged since), `toolkit trust` (whose
code this user lets the stages run) and `toolkit keys` (the scoped API keys of `toolkit serve --keys`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from toolkit.cli.commands import KeyOption, _command, _progress, _user_errors, app, err, out
from toolkit.errors import ToolkitError


@_command
def sign(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle to sign."),
    key: Path = typer.Option(..., "--key", metavar="KEY", help="Elliptic-curve private key, PEM (e.g. `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`)."),
    password: str | None = typer.Option(None, envvar="TOOLKIT_KEY_PASSWORD", show_envvar=True, help="The key's password, if it has one."),
) -> None:
    """Sign every file of a bundle (the manifest, graphs, weights, assets, parts) into DIR/model.sig,
    offline with OpenSSF model-signing; `toolkit verify`, `toolkit.load(DIR, verify=PUB)` and
    `toolkit serve --verify PUB` check it. Signs only a bundle whose files match their sha256."""
    from toolkit.bundle.signing import sign as sign_bundle

    signature = sign_bundle(bundle_dir, key, password=password)
    out.print(f"signed {bundle_dir}: {signature}; verify with `toolkit verify {bundle_dir} --pub PUB`")


@_command
def verify(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle to verify."),
    pub: Path = typer.Option(..., "--pub", metavar="PUB", help="The signer's public key, PEM (`openssl ec -in key.pem -pubout -out key.pub`)."),
) -> None:
    """Check a bundle's signature against a public key and every file against it; exit 1 naming the
    file that changed, or saying it is unsigned or signed by another key."""
    from toolkit.bundle.signing import verify as verify_bundle

    verify_bundle(bundle_dir, pub)
    out.print(f"{bundle_dir}: signature verified; every file is as signed")


@_command
def trust(
    bundle_dirs: list[Path] | None = typer.Argument(None, metavar="DIR...", help="Bundles whose source you vouch for."),
    revoke: bool = typer.Option(False, "--revoke", help="Withdraw trust from these bundles instead."),
    show: bool = typer.Option(False, "--list", help="List the bundles trusted, and whether each still names the code it did."),
) -> None:
    """Vouch for the PyTorch source a bundle names (a factory, a Hugging Face directory), so that
    check, quantize, optimize, bench and explain rebuild it without --trust-source. Remembered per
    user while the bundle stays where it is and names the same, unchanged code (export, build and
    prune remember what they make); a changed source is untrusted again."""
    from toolkit.bundle import Bundle, Source
    from toolkit.bundle.trust import forget, remember, trust_file, trusted, trusted_bundles

    if show:
        entries = trusted_bundles()
        for path, entry in sorted(entries.items()):
            try:
                state = "trusted" if trusted(Bundle.open(path)) else "changed since: untrusted"
            except ToolkitError as exc:
                state = f"cannot be opened: {exc}"
            out.print(f"{path}: {Source.from_json(entry['source']).describe()} ({state})")
        err.print(f"{len(entries)} bundles in {trust_file()}")
        return
    if not bundle_dirs:
        raise ToolkitError("give the bundle directories to trust (or --revoke them), or --list.")
    for directory in bundle_dirs:
        if revoke:
            out.print(f"{directory}: {'no longer trusted' if forget(directory) else 'was not trusted'}")
            continue
        bundle = Bundle.open(directory)
        remember(bundle)
        out.print(f"trusted {directory}: its reference {bundle.manifest.source.describe()} may be rebuilt while it names the same code")


@_command
def encrypt(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle to encrypt."),
    recipients: list[Path] = typer.Option(..., "--recipient", "-r", metavar="KEY", help="Who may open it (repeatable): an X25519 or RSA "
                                          "public key, PEM (`openssl genpkey -algorithm X25519 -out key.pem && openssl pkey -in key.pem "
                                          "-pubout -out key.pub`), or a key file of 32 random bytes that a KMS holds (`openssl rand -out kek.bin 32`)."),
    out_dir: Path | None = typer.Option(None, "-o", "--out", help="Write the encrypted bundle here (default: in place of DIR)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Encrypt a bundle at rest: every graph, weight and tokenizer file sealed with AES-256-GCM under a
    random data key, the data key wrapped for each recipient. The manifest stays readable. load, run,
    generate, serve, bench and package open the result with --key, decrypting in memory only; sign it
    after encrypting (the signature is checked before anything is decrypted)."""
    from toolkit.bundle.encryption import encrypt as seal

    target = seal(bundle_dir, recipients=list(recipients), out=out_dir, force=force, progress=_progress)
    out.print(f"encrypted {target} for {len(recipients)} recipient(s); open it with --key KEY (or TOOLKIT_BUNDLE_KEY). "
              + ("The plaintext files were removed; their disk blocks may still hold them until overwritten."
                 if out_dir is None else f"{bundle_dir} is still in the clear: remove it once the encrypted copy is where it belongs."))


@_command
def decrypt(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Encrypted bundle."),
    key: KeyOption = None,
    out_dir: Path | None = typer.Option(None, "-o", "--out", help="Write the decrypted bundle here (default: in place of DIR)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Write an encrypted bundle back in the clear (for the stages that rewrite graphs: check,
    optimize, quantize); every file is authenticated and checked against its sha256 first."""
    from toolkit.bundle.encryption import decrypt as unseal

    if key is None:
        raise ToolkitError("give the key the bundle was sealed for: --key KEY (or TOOLKIT_BUNDLE_KEY).")
    target = unseal(bundle_dir, key=key, out=out_dir, force=force, progress=_progress)
    out.print(f"decrypted {bundle_dir} into {target}")


keys_app = typer.Typer(help="Scoped API keys for `toolkit serve --keys FILE`: each key may do only what its scopes say.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _keys_command(name: str) -> Any:
    return lambda function: keys_app.command(name)(_user_errors(function))


@_keys_command("add")
def keys_add(
    file: Path = typer.Argument(..., metavar="FILE", help="The keys file (created if missing)."),
    name: str = typer.Option(..., "--name", help="Who or what holds the key (shown in the access log)."),
    scopes: list[str] = typer.Option(..., "--scope", "-s", help="What the key may do (repeatable): infer:MODEL, generate:MODEL, "
                                     "explain:MODEL (MODEL may be *), metrics, admin (the model repository)."),
) -> None:
    """Make a new key: its secret is printed once, and only its sha256 is written to FILE."""
    from toolkit.serve.keys import add_key

    secret = add_key(file, name, scopes)
    out.print(secret)
    err.print(f"added key {name!r} to {file} ({', '.join(scopes)}); the secret above is not stored anywhere: keep it now. "
              "A running server reads FILE again on SIGHUP.")


@_keys_command("list")
def keys_list(file: Path = typer.Argument(..., metavar="FILE", help="The keys file.")) -> None:
    """Each key's name and scopes (never its secret: FILE holds only hashes)."""
    from toolkit.serve.keys import read_keys

    for key in read_keys(file):
        out.print(f"{key.name}\t{', '.join(key.scopes)}")


@_keys_command("revoke")
def keys_revoke(file: Path = typer.Argument(..., metavar="FILE", help="The keys file."),
                name: str = typer.Option(..., "--name", help="The key to remove.")) -> None:
    """Remove a key; a running server stops accepting it on SIGHUP."""
    from toolkit.serve.keys import revoke_key

    revoke_key(file, name)
    err.print(f"revoked {name!r} in {file}; send the server SIGHUP (`kill -HUP PID`) for it to take effect.")
