"""Evaluation: run.py (multiple-choice eval), report.py, fidelity.py (formats against
the reference)."""
