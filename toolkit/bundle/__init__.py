"""Bundles: the manifest (what a bundle holds, where it came from) and the directory that stores it,
validated when opened, written atomically under a lock, verified on load, and signed on request.
Imports neither torch nor the compile side."""

from toolkit.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Source, Variant, safe_name
from toolkit.bundle.store import Bundle, replace_directory, sha256_file, staged_directory, write_atomic
from toolkit.bundle.validate import SIGNATURE_NAME, is_safe_name

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "SIGNATURE_NAME", "Bundle", "Manifest", "Source", "Variant", "is_safe_name",
           "replace_directory", "safe_name", "sha256_file", "staged_directory", "write_atomic"]
