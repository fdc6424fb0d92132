"""The Qwen2.5-VL family on the heavy side (HuatuoGPT-Vision-7B-Qwen2.5VL): tiny.py (a
format-exact tiny checkpoint), checkpoint.py (open an upstream folder, both tensor
layouts), reference.py (the torch reference engine); GGUF / ONNX writers beside them."""
