"""Shared by the benchmarks: run a measurement in its own child process (wall time, peak RSS of
that child alone), describe the machine, write a result table and its JSON."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


# Children are started by a tiny launcher (python -I -S, ~10 MB, no imports), never by the
# benchmark itself: Linux carries the peak RSS of the parent's address space across fork/exec into
# the child's ru_maxrss, so a child of a torch-importing process would report that process's peak.
# The launcher also samples /proc/PID/status (RssAnon / RssFile peaks) and /proc/PID/io.
LAUNCHER = r"""
import json, os, sys, threading, time
result, cmd = sys.argv[1], sys.argv[2:]
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
io = {}
t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
stop = threading.Event()
def sample():
    while not stop.is_set():
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(rest.split()[0]))
            with open("/proc/%d/io" % pid) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    io[key] = int(rest)
        except (OSError, ValueError, IndexError):
            pass
        stop.wait(0.02)
th = threading.Thread(target=sample, daemon=True)
th.start()
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
stop.set()
th.join()
with open(result, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "user_s": ru.ru_utime,
               "sys_s": ru.ru_stime, "maxrss_kb": ru.ru_maxrss, "peak_kb": peak,
               "majflt": ru.ru_majflt, "minflt": ru.ru_minflt, "io": io}, f)
"""


def launch(cmd: Sequence[str], *, log: Path, env: Optional[dict[str, str]] = None, cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` through :data:`LAUNCHER`, stdout and stderr into ``log``; its rusage record
    (``rc``, ``wall_s``, ``user_s``, ``sys_s``, ``maxrss_kb``, sampled ``peak_kb``, ``io``, ...)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), *cmd],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"launcher failed for {list(cmd)} (see {log})")
    return json.loads(result.read_text())


def child(cmd: Sequence[str], env: Optional[dict[str, str]] = None, cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` alone: ``{"wall_s", "cpu_s", "peak_rss_mib", "loadavg_before", "output", "rc"}``,
    peak RSS of that process only (see :data:`LAUNCHER`); ``output`` is its stdout and stderr."""
    import tempfile

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        ru = launch(cmd, log=log, env=full_env, cwd=cwd)
        output = log.read_text(errors="replace")
    return {"wall_s": ru["wall_s"], "cpu_s": ru["user_s"] + ru["sys_s"], "peak_rss_mib": ru["maxrss_kb"] / 1024,
            "loadavg_before": load, "output": output, "rc": ru["rc"]}


def last_json(result: dict[str, Any], what: str) -> dict[str, Any]:
    """The JSON object a measurement child printed on its last stdout line."""
    if result["rc"] != 0:
        tail = result["output"].strip().splitlines()[-3:]
        raise SystemExit(f"measurement '{what}' failed (exit {result['rc']}): {' | '.join(tail)}")
    return json.loads(result["output"].strip().splitlines()[-1])


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])


def save(name: str, title: str, command: str, body: str, data: dict[str, Any], results: Path = RESULTS_DIR) -> Path:
    """``<results>/<name>.md`` (title, command, machine, ``body``) and ``<name>.json`` (``data`` + the same)."""
    results.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine()
    text = f"# {title}\n\nCommand: `{command}`  \nRun {when} on {info}\n\n{body.rstrip()}\n"
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps({"command": command, "when": when, "machine": info, **data},
                                                     indent=1, default=str) + "\n")
    return results / f"{name}.md"
