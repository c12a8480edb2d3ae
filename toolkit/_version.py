"""The package version, importable without the package's API (which imports the whole runtime)."""

__version__ = "0.1.0"
