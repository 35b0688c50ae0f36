#!/usr/bin/env python3
"""Change-to-committed latency of real-time sources, and the agent's memory.

Starts the real release binaries (hubvault-collector, hubvault-agent,
hubvault) on 127.0.0.1 in a temp directory, generates a tree of N files,
defines it as a real-time source with the default debounce (quiet 1 s,
max delay 5 s), waits for the first snapshot, then makes one change at a
time (append to a random file) and measures from the write to the
collector's commit time of the next snapshot. Reports p50/p99 per size and
the agent's peak RSS (VmHWM) during the initial backup and, separately,
while watching and committing the changes.

Usage:  cargo build --release
        python3 benches/latency/latency.py --sizes 1000,100000,1000000
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent.parent


def run(cmd, env=None, check=True):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr}")
    return r.stdout


def vm(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def generate(root: Path, n: int, per_dir: int = 100) -> list[Path]:
    """n files of 200-2000 bytes, per_dir to a directory, two levels deep."""
    files = []
    rnd = random.Random(n)
    for i in range(n):
        d = root / f"d{i // (per_dir * 100):04d}" / f"s{(i // per_dir) % 100:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:07d}.txt"
        p.write_bytes(rnd.randbytes(rnd.randint(200, 2000)))
        if i % max(1, n // 200) == 0:
            files.append(p)
    return files


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def bench_size(bins: Path, n: int, changes: int, work: Path) -> dict:
    env = dict(os.environ, HUBVAULT_LOG="warn")
    data, state, src = work / "data", work / "agent", work / "src"
    t = time.time()
    sample = generate(src, n)
    gen_s = time.time() - t
    run([bins / "hubvault-collector", "init", "--kdf-memory-kib", "8192", "--data", data])
    coll = subprocess.Popen(
        [bins / "hubvault-collector", "run", "--listen", "127.0.0.1:0", "--data", data],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    addr = coll.stdout.readline().strip().removeprefix("listening on ")
    env.update(HUBVAULT_ADMIN=str(data / "admin"), HUBVAULT_COLLECTOR=f"https://{addr}")
    hv = lambda *a: run([bins / "hubvault", *a], env=env)
    agent = None
    try:
        hv("site", "add", "bench")
        token = hv("enroll-token", "--site", "bench").strip()
        run([bins / "hubvault-agent", "enroll", "--kdf-memory-kib", "8192",
             "--collector", f"https://{addr}", "--token", token, "--state", state], env=env)
        agent_id = json.loads(hv("agents", "--json"))[0]["id"]
        hv("source", "add", "--agent", agent_id, "--name", "live", "--path", str(src), "--realtime")
        log = open(work / "agent.log", "w")
        t0 = time.time()
        agent = subprocess.Popen(
            [bins / "hubvault-agent", "run", "--state", state],
            stderr=log, env=dict(env, HUBVAULT_LOG="info"))

        def snaps():
            return [s for s in json.loads(hv("snapshots", "--json")) if s["source"] == "live"]

        while not snaps():
            time.sleep(0.2)
        initial_s = time.time() - t0
        initial_hwm = vm(agent.pid, "VmHWM")
        # Reset the peak (clear_refs 5) so the next reading is the peak while
        # watching and committing changes, apart from the initial backup.
        try:
            Path(f"/proc/{agent.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        lat = []
        rnd = random.Random(1)
        for i in range(changes):
            before = len(snaps())
            p = rnd.choice(sample)
            w_ns = time.time_ns()
            with open(p, "ab") as f:
                f.write(f"change {i}\n".encode())
            while True:
                s = snaps()
                if len(s) > before:
                    lat.append((max(x["time_ns"] for x in s) - w_ns) / 1e9)
                    break
                time.sleep(0.05)
        hwm = vm(agent.pid, "VmHWM")
        return {
            "files": n, "generate_s": round(gen_s, 1), "initial_s": round(initial_s, 1),
            "changes": changes, "p50_s": round(percentile(lat, 0.5), 2),
            "p99_s": round(percentile(lat, 0.99), 2), "max_s": round(max(lat), 2),
            "agent_initial_hwm_mib": round(initial_hwm / 1024, 1),
            "agent_watching_hwm_mib": round(hwm / 1024, 1),
            "agent_rss_mib": round(vm(agent.pid, "VmRSS") / 1024, 1),
            "collector_hwm_mib": round(vm(coll.pid, "VmHWM") / 1024, 1),
        }
    finally:
        for p in (agent, coll):
            if p:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--bin", type=Path, default=CHECKOUT / "target" / "release")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"hv-latency-{n}-"))
        try:
            r = bench_size(a.bin, n, a.changes, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(r), flush=True)
        rows.append(r)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
