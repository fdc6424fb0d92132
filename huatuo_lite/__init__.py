"""huatuo-lite: run HuatuoGPT-Vision offline (GGUF / ONNX / torch reference)."""
__version__ = "0.1.0"
