"""configs/ and launch/ of the source tree, installed inside the package (see pyproject.toml)."""
