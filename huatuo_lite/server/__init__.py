"""The OpenAI-compatible server, one way down: run.py -> app.py -> policy.py."""
