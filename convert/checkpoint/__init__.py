"""Upstream checkpoints: read.py (names, layouts), dims.py, files.py, writer.py."""
