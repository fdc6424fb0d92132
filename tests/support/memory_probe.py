"""Peak memory of a script run in a fresh interpreter (shared by the conversion memory tests).

Each child prints its own peak RSS from /proc (VmHWM belongs to the process image: Linux's
ru_maxrss survives exec, so a child of a big pytest process would report the parent's size)."""
from __future__ import annotations

import subprocess
import sys

REPORT = """
import re
print("PEAK_KB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def child_peak_mb(script: str, *args) -> float:
    """Run `script` in a fresh interpreter and return its peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", script + REPORT, *map(str, args)], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024
