"""Batch answering: run.py (files, resume, pool), answerer.py (one model per worker),
ray.py (the same on a Ray cluster), records.py (input records)."""
