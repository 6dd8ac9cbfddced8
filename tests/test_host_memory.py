"""grpo/host_memory.py: with glibc's mmap and trimming off, a freed 64 MiB block stays in the process instead of
going back to the kernel. Each case runs in a fresh interpreter (the setting is process-wide)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
from grpo.host_memory import keep_freed_memory
status = keep_freed_memory() if sys.argv[2] == "keep" else "untouched"
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
held = rss_mib()
del block
print(json.dumps({"status": status, "released_mib": held - rss_mib()}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GRPO_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_a_freed_block_stays_in_the_process():
    # Default glibc hands a 64 MiB block back to the kernel on free (mmap / trim): RSS drops by its 64 MiB, and the
    # next step's block must be faulted in again. Kept: RSS stays, the pages wait for reuse.
    assert probe("untouched")["released_mib"] > 60
    kept = probe("keep")
    assert kept["status"].startswith("freed memory kept")
    assert kept["released_mib"] < 1


def test_opt_out_and_the_users_own_settings_leave_malloc_alone():
    assert probe("keep", GRPO_KEEP_FREED_MEMORY="0")["status"] == "default malloc (GRPO_KEEP_FREED_MEMORY=0)"
    assert "MALLOC_" in probe("keep", MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="1")["status"]
