"""A full disk says so and names the path: real writes into a tiny tmpfs (mounted in a user namespace, so no root
is needed; skipped where the kernel forbids that). Writing a checkpoint there fails in safetensors (weights) or in
torch.save (optimizer state, whose C++ error says only "unexpected pos …"); either way the user sees one line."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.errors import DiskFullError, disk_full_error, report_disk_full

ROOT = Path(__file__).resolve().parents[1]

# Saves a tiny llama's checkpoint (weights ~390 KB, AdamW state ~780 KB) into argv[1] through the CLI wrapper.
SAVE = """
import sys, torch
sys.path.insert(0, {root!r})
from grpo.checkpoint import save_checkpoint
from grpo.cli import run_cli
from grpo.models import tiny_llama
from grpo.optim import build_optimizer

def main(argv):
    model = tiny_llama(vocab_size=256, hidden=64, layers=2, heads=4)
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.99), 0.0)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # AdamW state exists only after a step
    save_checkpoint(argv[0], 1, model, None, optimizer, None, {{}})

try:
    run_cli(main)
except SystemExit as stop:  # the writer's own error, for the test to see which write hit the full disk
    print("cause:", repr(stop.__context__.__cause__))
    raise
"""


def _userns_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _userns_mount_works(), reason="cannot mount a tmpfs in a user namespace here")
@pytest.mark.parametrize("size, failing_writer", [("128k", "safetensors"), ("900k", "torch.save")])
def test_checkpoint_on_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, size, failing_writer):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    code = SAVE.format(root=str(ROOT))
    cmd = f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "{sys.executable}" -c "$0" "{mount}/run" "$@"'
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd, code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]  # besides transformers' bar
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: disk full while writing {mount}/run/checkpoint-0000001 (")
    assert "MiB free there): free some space" in errors[0]
    # The weights fit in 900k, so there the full disk hit torch.save of optimizer.pt, with its vague C++ error.
    cause = {"safetensors": "No space left on device", "torch.save": "unexpected pos"}[failing_writer]
    assert cause in proc.stdout, proc.stdout


def test_short_write_on_a_roomy_disk_is_not_called_disk_full(tmp_path):
    # torch.save's vague C++ error means a full disk only when the disk is (nearly) full; here it is a bug.
    assert disk_full_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                           tmp_path) is None
    with pytest.raises(RuntimeError):
        with report_disk_full(tmp_path):
            raise RuntimeError("unexpected pos 1 vs 0")


def test_enospc_and_quota_become_disk_full_errors_naming_the_path(tmp_path):
    for code in (errno.ENOSPC, errno.EDQUOT):
        with pytest.raises(DiskFullError, match=f"disk full while writing {tmp_path}/x"):
            with report_disk_full(tmp_path / "x"):
                raise OSError(code, os.strerror(code))
