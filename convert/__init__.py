"""The heavy side of huatuo-lite (torch, transformers, gguf, onnx, peft):
checkpoint reading, the tiny-model factory, GGUF and ONNX export, training.
Installed as `huatuo_lite.convert`; the runtime never imports it at import time."""
