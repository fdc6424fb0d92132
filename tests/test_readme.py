"""Every ```python block in README.md runs as a newcomer would run it: in a fresh
process, from an empty folder, with no model store and no HUATUO_LITE_MODEL (so
`huatuo_lite.load()` finds the bundled demo model)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BLOCKS = BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block to run"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HUATUO_LITE_MODEL"}
    env.update(HUATUO_LITE_HOME=str(tmp_path / "store"), OMP_NUM_THREADS="1")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), "the block printed nothing"
    assert "Traceback" not in done.stderr
