"""LoRA / full fine-tuning: run.py (the recipe), data.py, model.py, merge.py."""
