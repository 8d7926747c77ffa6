"""Process plumbing of ``benchmarks.gpu_check``: run one part as a child with a time limit
(its output echoed live), install carried wheels, read train.py's step lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULT_TAG = "@@GPU_CHECK_RESULT@@"  # the one line of a part's stdout that holds its result
# a row a part reports as soon as it has it: kept when the part later times out or crashes
PARTIAL_TAG = "@@GPU_CHECK_PARTIAL@@"
WARNING_RE = re.compile(r"(DeprecationWarning|FutureWarning)")
STEP_RE = re.compile(r"step\s+(\d+)/(\d+) \|.*\| ([\d.]+) ms \| ([\d,]+) tok/s")
COMPILE_RE = re.compile(r"compiling: ([\d.]+) s")


def run_child(cmd: list[str], limit_s: float, env: dict, cwd: Path) -> dict:
    """Run ``cmd`` for at most ``limit_s`` seconds, echoing its lines; returns status
    (ok | failed | timeout), seconds, the lines, the result line's JSON and warning lines."""
    t0 = time.monotonic()
    # a session of its own: on timeout the whole group goes (torch.compile's workers too)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, errors="replace")
    lines: list[str] = []
    partials: list[dict] = []
    box: dict = {}

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_TAG):
                box["result"] = json.loads(line[len(RESULT_TAG):])
                continue
            if line.startswith(PARTIAL_TAG):
                partials.append(json.loads(line[len(PARTIAL_TAG):]))
                continue
            lines.append(line)
            print("    | " + line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        status = "timeout"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    out = {"status": status, "seconds": time.monotonic() - t0, "lines": lines,
           "result": box.get("result"), "partials": partials, "warnings": warning_lines(lines)}
    if status == "ok" and proc.returncode != 0:
        out["status"] = "failed"
    if out["status"] != "ok" or (out["result"] is None and cmd[1] != "train.py"):
        tail = [ln for ln in lines if ln.strip()][-3:]
        out["error"] = (f"{out['status']} after {out['seconds']:.0f} s (exit {proc.returncode})"
                        + (": " + " / ".join(t.strip()[:200] for t in tail) if tail else ""))
        if out["status"] == "ok":
            out["status"] = "failed"
    return out


def warning_lines(lines: list[str]) -> list[str]:
    """Deprecation and future warnings a part printed, once each: the APIs that may break on
    the next jax/flax/torch."""
    seen: list[str] = []
    for line in lines:
        if WARNING_RE.search(line):
            text = line.strip()[:300]
            if text not in seen:
                seen.append(text)
    return seen


def install_wheels(folder: Path, target: Path) -> dict:
    """pip-install every wheel of ``folder`` (no index, no network) into ``target``, which the
    parts get on their path: the image's Python stays untouched and nothing needs root."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"status": "none", "folder": str(folder)}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
           "--find-links", str(folder), "--target", str(target), *map(str, wheels)]
    print(f"installing {len(wheels)} wheel(s) from {folder}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"folder": str(folder), "wheels": [w.name for w in wheels]}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(out, status="failed", error=tail[0][:300])
    return dict(out, status="installed", site=str(target))


def parse_train_output(lines: list[str], status: str) -> dict:
    """train.py's step lines: the last one as printed, and the median tokens/s of the steps
    after the first (the first includes the compile)."""
    steps = [(int(m.group(1)), float(m.group(3)), float(m.group(4).replace(",", "")), ln)
             for ln in lines if (m := STEP_RE.search(ln))]
    out: dict = {"status": status, "steps_logged": len(steps)}
    compile_s = [float(m.group(1)) for ln in lines if (m := COMPILE_RE.search(ln))]
    if compile_s:
        out["first_step_compile_s"] = compile_s[0]
    if header := next((ln for ln in lines if ln.startswith("jax on ")), None):
        out["header"] = header[:300]
    if steps:
        tps = sorted(s[2] for s in steps)
        out.update(last_line=steps[-1][3].strip(), tokens_per_s_median=tps[len(tps) // 2],
                   step_ms=[s[1] for s in steps])
    if status != "ok" or not steps:
        tail = [ln for ln in lines if ln.strip()][-3:]
        out["error"] = f"{status}, {len(steps)} timed step lines: " + " / ".join(
            t.strip()[:200] for t in tail)
    return out
