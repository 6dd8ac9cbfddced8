"""What the benches print about the machine they ran on, so a table can say which CPU made it."""
from __future__ import annotations

import subprocess


def cpu_flags() -> str:
    """lscpu's model name and its AVX2 / AVX-512 / AMX flags (what the CPU GEMM and SDPA kernels can use; bf16 is
    native with avx512_bf16 or amx_bf16)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = lines.get("Flags", "").split()
    simd = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    return f"{lines.get('Model name', '?').strip()}; flags: {' '.join(simd) or 'no AVX2/AVX-512/AMX'}"
