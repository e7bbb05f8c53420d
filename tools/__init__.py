"""Benchmarks and diagnostics (`python tools/<name>.py`); a package too, so tests import them by name."""
