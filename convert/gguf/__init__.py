"""GGUF export: export.py (the folder), text.py, mmproj.py, stream.py, imatrix.py."""
