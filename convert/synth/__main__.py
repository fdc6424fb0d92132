"""`python -m huatuo_lite.convert.synth OUT_DIR ...` draws the synthetic set."""
from .make import main

main()
