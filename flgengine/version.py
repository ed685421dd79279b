"""The flgengine version (written into bundle provenance and engine manifests)."""

__version__ = "0.1.0"
