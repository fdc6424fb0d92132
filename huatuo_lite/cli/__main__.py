"""`python -m huatuo_lite.cli` runs the command line."""
from .main import main

main()
