"""ONNX export: export.py (the folder), builder.py, graph.py, quant.py, stream.py, vision*.py."""
