"""Shared runtime pieces: distributed setup, atomic I/O, checkpoints, logging, stop signals."""
