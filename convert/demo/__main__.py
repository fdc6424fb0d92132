"""`python -m huatuo_lite.convert.demo OUT_DIR ...` builds the demo model."""
from .build import main

main()
