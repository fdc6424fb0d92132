"""Data that ships with huatuo-lite: the model registry, example images, the demo model."""
