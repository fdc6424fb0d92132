"""Plain helpers shared by tests (fixtures live in conftest.py files)."""
