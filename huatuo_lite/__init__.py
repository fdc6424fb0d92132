"""huatuo-lite: run HuatuoGPT-Vision offline (GGUF / ONNX / torch reference).

    import huatuo_lite
    with huatuo_lite.load("models/demo/gguf") as model:
        print(model.ask("chest.png", "What is shown?").text)

`load` and the result types are imported on first use, so `import huatuo_lite`
stays light (no numpy, engine or model code until a model is loaded).
"""
__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
LAZY_EXPORTS = {
    "load": ".api",
    "HuatuoVision": ".api",
    "Answer": ".generate",
    "GenerationConfig": ".family",
    "Turn": ".prompt",
    "HuatuoError": ".errors",
}
__all__ = ["__version__", *LAZY_EXPORTS]


def __getattr__(name):
    if name not in LAZY_EXPORTS:
        raise AttributeError(f"module 'huatuo_lite' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(LAZY_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
