"""vLLM's side of bench/generation.py: one long-lived ``vllm.LLM`` in vLLM's own venv, driven over a pipe.

    ~/.cache/grpo-ner/venv-vllm/bin/python bench/_vllm_side.py MODEL_FOLDER --threads 2 [--eager]

Server (``main``, run by the vLLM venv's interpreter): builds one ``vllm.LLM`` on the model folder with the
arguments grpo/vllm_engine.py uses (dtype, max_model_len 2048, seed 0, prefix caching, processed log-probs, 1 GiB
KV cache on CPU), either ``enforce_eager=True`` (``--eager``) or vLLM's default compiled mode (torch.compile with
inductor; 1-1.5 min of compiling on 2 CPU cores, every start). The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as in VLLMEngine), so ``time.process_time`` counts all of vLLM's CPU time.
Threads: vLLM's in-process CPU worker does no OpenMP binding (``VLLM_CPU_OMP_THREADS_BIND`` is read only by the
multiprocess executor) and replaces ``torch.set_num_threads`` with a no-op once it starts, so the count is set
before: ``OMP_NUM_THREADS`` (which also stops vLLM from cutting torch to 1 thread for serving) and
``torch.set_num_threads(--threads)``; the ready line reports what torch then uses.

Start-up (import, engine build, compile, one small warm-up call) is reported and excluded from the timings. Then,
per stdin line, one JSON command ``{"prompts": [[ids], ...], "new": N, "seed": S}``: the prefix cache is reset
(as after every weight sync in training, so one call never reuses an earlier call's prompts; sharing within a
call stays), then one ``llm.generate`` of TokensPrompts with SamplingParams(n=1, T=1, top_p=1, max_tokens=N,
ignore_eos=True, one seed per prompt, logprobs=0 as the trainer asks); every output must hold exactly N tokens.
Reply: ``{"wall": s, "cpu": s, "tokens": n}``; with ``"profile": true`` the call runs under torch.profiler
and the reply carries its op table (``"profile"``). ``{"quit": true}`` or end of input stops the server.

Protocol lines go to the original stdout, each prefixed with ``@@vllm_side ``; everything else written to stdout
(vLLM's logger, C extensions) is redirected to stderr, which the client sends to a log file.

Client (``VLLMSide``, imported by bench/generation.py in the project's interpreter; stdlib only): starts the
server, waits for its ready line, sends commands, and stops it (close stdin, then kill its process group).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

PREFIX = "@@vllm_side "
PROFILE_ROWS = 18  # ops in a profile table, by self CPU time
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------- client
class VLLMSide:
    """One server process per mode ("eager" | "compiled"); blocks until it is ready (start-up timed here)."""

    def __init__(self, python: str, model: str, mode: str, threads: int, device: str = "cpu",
                 dtype: str = "float32", timeout: float = 1800.0):
        if mode not in ("eager", "compiled"):
            raise ValueError(f"vLLM mode {mode!r}: eager | compiled")
        self.mode = mode
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"vllm-{mode}-", suffix=".log", delete=False)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        cmd = [python, os.path.abspath(__file__), model, "--threads", str(threads), "--device", device,
               "--dtype", dtype] + (["--eager"] if mode == "eager" else [])
        start = time.perf_counter()
        # Own session: a Ctrl-C in the terminal reaches only the bench, whose close() then stops this process.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, start_new_session=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.info = self._reply(timeout, "start-up")
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - start

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self._replies.put(json.loads(line[len(PREFIX):]))
        self._replies.put(None)  # end of output: the server exited

    def _reply(self, timeout: float | None, what: str) -> dict:
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"vLLM {self.mode}: no reply to {what} within {timeout:.0f} s; log "
                               f"{self.log.name}:\n{self.log_tail()}") from None
        if msg is None or "error" in msg:
            why = "the server exited" if msg is None else msg["error"].strip().splitlines()[-1]
            raise RuntimeError(f"vLLM {self.mode}: {what} failed: {why}\nlog {self.log.name}:\n{self.log_tail()}")
        return msg

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def generate(self, prompts: list[list[int]], new: int, seed: int, profile: bool = False
                 ) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of the server's llm.generate call. profile: run it under
        torch.profiler and keep its op table in `self.profile_table`."""
        self.proc.stdin.write(json.dumps({"prompts": [[int(t) for t in p] for p in prompts], "new": new,
                                          "seed": seed, "profile": profile}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(None, "generate")
        assert reply["tokens"] == len(prompts) * new, reply
        self.profile_table = reply.get("profile", "")
        return reply["wall"], reply["cpu"]

    def close(self, timeout: float = 60.0) -> None:
        """Ask the server to stop (end of its input), then kill its process group if it is still there."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------- server
def _die_with_parent() -> None:
    """SIGTERM this process when the bench dies (Linux prctl PR_SET_PDEATHSIG), so no server is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _generate(llm, prompts: list[list[int]], new: int, seed: int, profile: bool = False) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)  # one seed per request, well spread (as grpo/vllm_engine.py's _per_prompt_seeds)
    params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=new, ignore_eos=True, stop_token_ids=[],
                             seed=rng.randrange(0, 2**31 - 1), logprobs=0, detokenize=False) for _ in prompts]
    inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache")
    profiler = None
    if profile:
        import torch

        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    table = ""
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
    lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
    if len(lengths) != len(prompts) or any(n != new for n in lengths):
        raise AssertionError(f"expected {len(prompts)} outputs of {new} tokens, got lengths {lengths}")
    return {"wall": wall, "cpu": cpu, "tokens": sum(lengths), "profile": table}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel: the original stdout
    os.dup2(2, 1)  # anything else printed to stdout (vLLM logs, C code) goes to stderr

    def send(msg: dict) -> None:
        proto.write(PREFIX + json.dumps(msg) + "\n")

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a safetensors model folder (config.json, tokenizer)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (else vLLM compiles)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv_gib", type=float, default=1.0, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE wins)")
    args = parser.parse_args()
    _die_with_parent()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: process_time covers it
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        start = time.perf_counter()
        import torch

        torch.set_num_threads(args.threads)  # before vLLM's worker turns set_num_threads into a no-op
        import vllm

        imported = time.perf_counter()
        kwargs: dict = dict(model=args.model, dtype=args.dtype, max_model_len=2048, seed=0,
                            enforce_eager=args.eager, logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if args.device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(args.kv_gib * GIB)
        else:
            kwargs["gpu_memory_utilization"] = 0.3
        llm = vllm.LLM(**kwargs)
        built = time.perf_counter()
        warm = _generate(llm, [list(range(100, 164)), list(range(200, 240))], 4, seed=0)
        ready = time.perf_counter()
        with open("/proc/self/status") as f:
            os_threads = next((int(line.split()[1]) for line in f if line.startswith("Threads:")), -1)
        children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
        send({"ready": True, "vllm": vllm.__version__, "import_s": imported - start, "build_s": built - imported,
              "warmup_s": ready - built, "torch_threads": torch.get_num_threads(), "os_threads": os_threads,
              "affinity": len(os.sched_getaffinity(0)), "child_processes": len(children),
              "warmup_cpu_per_wall": warm["cpu"] / max(warm["wall"], 1e-9),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    except BaseException:
        send({"error": traceback.format_exc()})
        raise
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        try:
            send(_generate(llm, cmd["prompts"], int(cmd["new"]), int(cmd["seed"]), bool(cmd.get("profile"))))
        except Exception:
            send({"error": traceback.format_exc()})
    del llm


if __name__ == "__main__":
    main()
