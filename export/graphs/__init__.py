"""One module per exported graph: the wrapper that is traced and its `ModuleSpec` (export/spec.py)."""
