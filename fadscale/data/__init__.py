"""Data stages: procedural tiles, sharding, streaming loader."""
