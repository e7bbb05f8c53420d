"""fadscale: feature-aligned diffusion (FAD) for synthetic histology, from one CPU to many GPU nodes."""

__version__ = "0.1.0"
