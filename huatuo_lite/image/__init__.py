"""Images in: load.py (any source -> RGB -> pixels), dicom.py, scale.py, limits.py."""
