"""Bundles: the manifest (what a bundle holds, where it came from) and the directory that stores it,
written atomically and verified on load. Imports neither torch nor the compile side."""

from toolkit.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Source, Variant, safe_name
from toolkit.bundle.store import Bundle, sha256_file, staged_directory, write_atomic

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Bundle", "Manifest", "Source", "Variant", "safe_name", "sha256_file",
           "staged_directory", "write_atomic"]
