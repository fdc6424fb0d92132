"""llama.cpp's native tools (llama-quantize, llama-imatrix, llama-mtmd-cli, llama-bench).

They are built by the project's CMakeLists.txt into build/bin (see native/README.md):

    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2

`find_tool` looks in $HUATUO_LLAMA_BIN, then build/bin of the current folder and of
the source checkout this package runs from, then PATH. `run_tool` runs one and turns
a failure into one sentence that ends with the tool's own last lines.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from .errors import HuatuoError

TOOLS = ("llama-quantize", "llama-imatrix", "llama-mtmd-cli", "llama-bench")
BIN_ENV = "HUATUO_LLAMA_BIN"            # a folder holding the tools (and the shared libraries)
BUILD_BIN = Path("build") / "bin"
BUILD_HINT = ("build them with `cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2` "
              f"in the huatuo-lite source folder, or set {BIN_ENV} to a folder holding them")
ERROR_TAIL_LINES = 6                    # of the tool's output, quoted in the error
CLI_DONE_MARK = "llama_perf_context_print:"   # logged by llama-mtmd-cli -v after the answer
CLI_ATTEMPTS = 10
MTMD_MARKER = "<__media__>"   # libmtmd's default media marker (mtmd_default_marker())


def candidate_dirs() -> list[Path]:
    """Folders searched before PATH, in order."""
    dirs = [Path(os.environ[BIN_ENV])] if os.environ.get(BIN_ENV) else []
    checkout = Path(__file__).resolve().parent.parent   # the source folder of an editable install
    return dirs + [Path.cwd() / BUILD_BIN, checkout / BUILD_BIN]


def find_tool(name: str, required: bool = True) -> Path | None:
    """The path of a built llama.cpp tool; None (or one sentence, if required) when absent."""
    if name not in TOOLS:
        raise HuatuoError(f"Unknown llama.cpp tool {name!r}: choose one of {', '.join(TOOLS)}.")
    exe = name + (".exe" if os.name == "nt" else "")
    for folder in candidate_dirs():
        if (folder / exe).is_file() and os.access(folder / exe, os.X_OK):
            return folder / exe
    found = shutil.which(name)
    if found:
        return Path(found)
    if required:
        raise HuatuoError(f"llama.cpp's {name} was not found: {BUILD_HINT}.")
    return None


def native_lib_dir() -> Path | None:
    """The folder of the built shared libraries (libllama, libggml*, libmtmd): the one
    beside llama-mtmd-cli, for LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB; None if not built."""
    tool = find_tool("llama-mtmd-cli", required=False)
    if tool is None:
        return None
    folder = tool.resolve().parent
    has_libs = any(folder.glob("libllama.*")) or (folder / "llama.dll").is_file()
    return folder if has_libs else None


def lib_env(lib_dir: Path | str, base: dict | None = None) -> dict:
    """An environment in which llama-cpp-python loads the libraries in lib_dir
    (llama_cpp reads LLAMA_CPP_LIB_PATH, llama_cpp.mtmd_cpp reads MTMD_CPP_LIB)."""
    env = dict(os.environ if base is None else base)
    env["LLAMA_CPP_LIB_PATH"] = env["MTMD_CPP_LIB"] = str(lib_dir)
    # their own dependencies (libggml*) from there too, not from a folder already on the path
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
    return env


def tool_env(exe: Path, base: dict | None = None, libs_first: Sequence = ()) -> dict:
    """The environment a tool runs in: its own folder's libraries first on LD_LIBRARY_PATH.
    Needed because importing llama_cpp puts llama-cpp-python's library folder on
    LD_LIBRARY_PATH of this process (and so of its children), which would otherwise win
    over the tool's RUNPATH. `libs_first`: folders to put before even those."""
    env = dict(os.environ if base is None else base)
    folders = [*map(str, libs_first), str(Path(exe).resolve().parent), env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, folders))
    return env


def run_tool(name: str, args: Sequence, timeout: float | None = None, env: dict | None = None,
             tool: Path | None = None, libs_first: Sequence = ()) -> subprocess.CompletedProcess:
    """Run a tool to completion with its own libraries (see tool_env) and return it
    (stdout as bytes: generated text may end mid-character; stderr as text)."""
    exe = tool or find_tool(name)
    command = [str(exe), *map(str, args)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False,
                              env=tool_env(exe, env, libs_first))
        done.stderr = done.stderr.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired:
        raise HuatuoError(f"{name} did not finish within {timeout:.0f} s; "
                          "give it more time or a smaller input.") from None
    except OSError as exc:
        raise HuatuoError(f"{name} ({exe}) could not start ({exc.strerror}); rebuild it: {BUILD_HINT}.") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-ERROR_TAIL_LINES:])
        raise HuatuoError(f"{name} failed with exit code {done.returncode}; its last lines say:\n{tail}")
    return done


def tool_version(name: str) -> str | None:
    """The build line a tool prints for --version (e.g. 'version: 1 (0c1e570)'), or None."""
    tool = find_tool(name, required=False)
    if tool is None:
        return None
    try:
        done = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.startswith("version")]
    return lines[0] if lines else None


def stock_mtmd_dir(folder: Path | str) -> Path:
    """`folder` with links to llama-cpp-python's own (stock, unfixed) libmtmd: given as
    mtmd_cli_answer(libmtmd_dir=...), a built tool runs with it (same llama.cpp version,
    same ABI; only the image graph differs). For comparisons; Linux."""
    import llama_cpp   # noqa: PLC0415 - only where a comparison is asked for

    stock = Path(llama_cpp.__file__).parent / "lib"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for lib in stock.glob("libmtmd.so*"):
        link = folder / lib.name
        if not link.exists():
            link.symlink_to(lib)
    return folder


def mtmd_cli_answer(text_gguf: Path, mmproj: Path, images: Sequence, question: str, n_predict: int,
                    threads: int = 1, libmtmd_dir: Path | None = None, timeout: float | None = 600,
                    extra_args: Sequence = (), markers: bool = False) -> bytes:
    """llama-mtmd-cli's greedy answer (raw bytes, stripped); see mtmd_cli_run."""
    return mtmd_cli_run(text_gguf, mmproj, images, question, n_predict, threads, libmtmd_dir, timeout,
                        extra_args, markers).stdout.strip()


def mtmd_cli_run(text_gguf: Path, mmproj: Path, images: Sequence, question: str, n_predict: int,
                 threads: int = 1, libmtmd_dir: Path | None = None, timeout: float | None = 600,
                 extra_args: Sequence = (), markers: bool = False) -> subprocess.CompletedProcess:
    """llama-mtmd-cli run greedy with -v (its answer on stdout, its log on stderr: the
    formatted prompt, the timings), prompted with the GGUF's embedded
    chat template (--jinja). As a stock user types it, -p is the bare question and the tool
    prepends one marker per image (no newline; the template adds upstream's). `markers`: write
    each image's marker + newline into -p ourselves instead. `libmtmd_dir`: a folder whose
    libmtmd replaces the built one."""
    from .families.llava import IMAGE_LINE, IMAGE_PLACEHOLDER

    prompt = IMAGE_LINE.replace(IMAGE_PLACEHOLDER, MTMD_MARKER) * len(images) * markers + question
    args = ["-m", text_gguf, "--mmproj", mmproj, "-p", prompt, "--temp", "0", "-n", n_predict,
            "-t", threads, "--jinja", "--no-warmup", "-c", 4096, "--seed", 0, *extra_args]
    for image in images:
        args += ["--image", image]
    # llama-mtmd-cli prints through llama.cpp's asynchronous logger, which it never flushes at
    # exit (llama.cpp issue 22142): under load the answer's tail can be lost. With -v it logs
    # a timing line after the answer, so its presence proves the answer came out whole.
    for _ in range(CLI_ATTEMPTS):
        done = run_tool("llama-mtmd-cli", [*args, "-v"], timeout=timeout,
                        libs_first=[libmtmd_dir] if libmtmd_dir else [])
        if CLI_DONE_MARK in done.stderr:
            return done
    raise HuatuoError(f"llama-mtmd-cli lost its output {CLI_ATTEMPTS} times in a row; "
                      "run it again on a less loaded machine.")


def self_test_verdict(result: dict | None) -> str:
    """One sentence on libmtmd's image path: the conversion's self-test (manifest
    "mtmd_self_test": libmtmd's image features vs vision.onnx's), for convert, models info
    and the model card."""
    if not result:
        return "Image-path self-test: not run (no vision.onnx was written)."
    if result.get("passed"):
        return (f"Image-path self-test: passed (min cosine {result['min_cosine']:.4f}, mean "
                f"{result['mean_cosine']:.4f}): this llama.cpp computes the image features like the reference.")
    if "min_cosine" not in result:
        return f"Image-path self-test: could not run ({result.get('error', 'unknown error')})."
    return (f"Image-path self-test: failed (min cosine {result['min_cosine']:.4f}, mean {result['mean_cosine']:.4f}): "
            "stock llama.cpp/Ollama image answers will be wrong until llama.cpp is fixed; "
            "huatuo-lite uses vision.onnx.")
