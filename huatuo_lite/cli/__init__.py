"""The huatuo-lite command line: main.py (the group and `ask`), common.py (shared
helpers), one module per command. `python -m huatuo_lite.cli` runs it."""
