#!/usr/bin/env python3
"""End to end over loopback against the local engine, on the repository benches' data.

Issue 3 asks for the end-to-end backup (agent -> collector over mTLS gRPC on
127.0.0.1) "on the same data as the repository benches", as a ratio to the
local engine (`hubvault repo backup`). This script takes the data sets of
benches/compare (generated the same way, reused when present) and, per set,
alternates fresh runs of:

- local: `hubvault repo init` + timed `hubvault repo backup SRC`;
- e2e:   a fresh collector (`hubvault-collector init` + `run`), a site, an
         enrolled agent, then timed `hubvault-agent backup --source docs SRC`
         (local backup into the spool and upload overlap; it returns once the
         collector committed the snapshot).

The source is read into the page cache before every timed run. Both sides
use default key-derivation settings. Reported: median wall and CPU seconds
of each, the ratio local wall / e2e wall (goal >= 0.8), the ratio local CPU /
agent CPU (what the office pays when the collector has a machine of its own,
as deployed; on this bench both share the cores), and the peak RSS of each.

`--split-cores` models that deployment with wall times: the local engine and
the agent run on the "office" cores only, the collector on the others (by
CPU affinity, inherited by every thread; the engine sizes its pipeline from
the cores it may use). The ratio is then what an office of that many cores
sees, with the collector elsewhere.

Python 3.11 standard library only; release binaries from target/release
(build them first: `cargo build --release --bins`).

    python3 benches/e2e/e2e.py [--sets mixed,small] [--runs 3] [--scale 1] [--split-cores]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parent
CHECKOUT = SCRIPT_DIR.parent.parent
sys.path.insert(0, str(SCRIPT_DIR.parent / "compare"))
import compare  # noqa: E402  (data sets, warm cache, timed child runs)

PASSPHRASE = "e2e-bench-passphrase"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"collector exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"collector not listening on {port} after {timeout} s")


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(cmd: list[str], env: dict) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class Cores:
    """Which CPUs the office side (local engine, agent) and the collector
    may use; None = all."""

    def __init__(self, office: set[int] | None, collector: set[int] | None):
        self.office, self.collector = office, collector

    @contextlib.contextmanager
    def office_side(self):
        """Children started through compare's spawner inherit the office cores."""
        if self.office is None:
            yield
            return
        compare.Spawner.start()
        pid = compare.Spawner._proc.pid
        os.sched_setaffinity(pid, self.office)
        try:
            yield
        finally:
            os.sched_setaffinity(pid, os.sched_getaffinity(0))

    def collector_preexec(self):
        """For Popen: pin the collector before exec, so all its threads are."""
        if self.collector is None:
            return None
        cpus = self.collector
        return lambda: os.sched_setaffinity(0, cpus)


def run_local(bins: Path, src: Path, work: Path, logs: Path, cores: Cores) -> dict:
    repo = work / "local-repo"
    shutil.rmtree(repo, ignore_errors=True)
    env = dict(os.environ, HUBVAULT_PASSPHRASE=PASSPHRASE)
    check([str(bins / "hubvault"), "repo", "init", "--repo", str(repo)], env)
    compare.warm(src)
    with cores.office_side():
        r = compare.run_timed([str(bins / "hubvault"), "repo", "backup", "--repo", str(repo), str(src)],
                              env, logs / "local.log")
    if r["rc"] != 0:
        raise SystemExit(f"local backup failed, see {logs / 'local.log'}")
    r["repo_bytes"] = compare.du_bytes(repo)
    shutil.rmtree(repo, ignore_errors=True)
    return r


def run_e2e(bins: Path, src: Path, work: Path, logs: Path, cores: Cores) -> dict:
    root = work / "e2e"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data, state = root / "data", root / "agent"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = dict(os.environ, HUBVAULT_ADMIN=str(data / "admin"), HUBVAULT_COLLECTOR=url,
               HUBVAULT_LOG="warn")
    check([str(bins / "hubvault-collector"), "init", "--data", str(data)], env)
    with open(logs / "collector.log", "ab") as clog:
        coll = subprocess.Popen([str(bins / "hubvault-collector"), "run", "--data", str(data),
                                 "--listen", f"127.0.0.1:{port}"],
                                env=env, stdout=clog, stderr=clog,
                                preexec_fn=cores.collector_preexec())
    try:
        wait_listening(port, coll)
        check([str(bins / "hubvault"), "site", "add", "bench"], env)
        token = check([str(bins / "hubvault"), "enroll-token", "--site", "bench",
                       "--ttl", "1h"], env).strip()
        check([str(bins / "hubvault-agent"), "enroll", "--collector", url, "--token", token,
               "--state", str(state)], env)
        compare.warm(src)
        c0 = cpu_s(coll.pid)
        with cores.office_side():
            r = compare.run_timed([str(bins / "hubvault-agent"), "backup", "--source", "docs",
                                   "--state", str(state), str(src)], env, logs / "agent.log")
        if r["rc"] != 0:
            raise SystemExit(f"agent backup failed, see {logs / 'agent.log'}")
        r["collector_cpu_s"] = round(cpu_s(coll.pid) - c0, 2)
        r["collector_peak_rss_mib"] = round(vm_hwm_mib(coll.pid), 1)
        r["collector_repo_bytes"] = compare.du_bytes(data / "repo")
    finally:
        coll.terminate()
        try:
            coll.wait(timeout=30)
        except subprocess.TimeoutExpired:
            coll.kill()
    shutil.rmtree(root, ignore_errors=True)
    return r


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/hubvault-compare", help="work dir shared with compare.py (data sets)")
    ap.add_argument("--sets", default="mixed,small")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3, help="runs of each side per set (alternating)")
    ap.add_argument("--bins", default=str(CHECKOUT / "target" / "release"))
    ap.add_argument("--out", default=None,
                    help="results path without suffix (default results/latest, results/split-cores with --split-cores)")
    ap.add_argument("--split-cores", action="store_true",
                    help="local engine and agent on the first half of the cores, the collector on the rest")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(SCRIPT_DIR / "results" / ("split-cores" if args.split_cores else "latest"))
    cpus = sorted(os.sched_getaffinity(0))
    if args.split_cores:
        if len(cpus) < 2:
            raise SystemExit("--split-cores needs at least 2 cores")
        half = len(cpus) // 2
        cores = Cores(set(cpus[:half]), set(cpus[half:]))
    else:
        cores = Cores(None, None)
    bins = Path(args.bins)
    for b in ("hubvault", "hubvault-agent", "hubvault-collector"):
        if not (bins / b).is_file():
            raise SystemExit(f"{bins / b} missing: cargo build --release --bins")
    work = Path(args.work)
    logs = work / "logs" / "e2e"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": args.runs,
               "office_cores": sorted(cores.office) if cores.office else cpus,
               "collector_cores": sorted(cores.collector) if cores.collector else cpus,
               "checkout": compare.first_line(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"]),
               "sets": {}}
    for name in args.sets.split(","):
        params = compare.set_params(name, args.scale)
        src = compare.ensure_set(work, params)
        files, dirs, total = compare.tree_stats(src)
        local, e2e = [], []
        for i in range(args.runs):
            local.append(run_local(bins, src, work, logs, cores))
            e2e.append(run_e2e(bins, src, work, logs, cores))
            compare.log(f"{name} run {i + 1}: local {local[-1]['wall_s']:.2f} s, "
                        f"e2e {e2e[-1]['wall_s']:.2f} s, collector peak {e2e[-1]['collector_peak_rss_mib']} MiB")
        row = {
            "files": files, "bytes": total,
            "local_wall_s": median(local, "wall_s"), "local_cpu_s": median(local, "cpu_s"),
            "e2e_wall_s": median(e2e, "wall_s"), "agent_cpu_s": median(e2e, "cpu_s"),
            "agent_peak_rss_mib": median(e2e, "peak_rss_mib"),
            "collector_cpu_s": median(e2e, "collector_cpu_s"),
            "collector_peak_rss_mib": median(e2e, "collector_peak_rss_mib"),
            "local_walls": [r["wall_s"] for r in local], "e2e_walls": [r["wall_s"] for r in e2e],
        }
        row["ratio"] = round(row["local_wall_s"] / row["e2e_wall_s"], 2)
        row["local_mb_s"] = round(total / 1e6 / row["local_wall_s"], 1)
        row["e2e_mb_s"] = round(total / 1e6 / row["e2e_wall_s"], 1)
        # Where the collector runs on its own machine (as deployed), the
        # office's cost is the agent's CPU against the local engine's.
        row["agent_cpu_ratio"] = round(row["local_cpu_s"] / row["agent_cpu_s"], 2)
        results["sets"][name] = row
    lines = [f"# hubvault end to end over loopback vs the local engine — {results['date']}", "",
             f"- checkout {results['checkout']}; {os.cpu_count()} cores; "
             + (f"split cores: local engine and agent on CPUs {sorted(cores.office)}, collector on "
                f"{sorted(cores.collector)}; " if cores.office else "all processes share the cores; ")
             + f"median of {args.runs} alternating runs; "
             "warm source; ratio = local wall / e2e wall (goal >= 0.8); agent CPU ratio = local CPU / agent CPU "
             "(the agent's share when the collector has its own machine)", "",
             "| set | files | MiB | local wall s | local MB/s | local CPU s | e2e wall s | e2e MB/s | agent CPU s "
             "| collector CPU s | agent RSS MiB | collector RSS MiB | ratio | agent CPU ratio | runs local / e2e |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["sets"].items():
        lines.append(f"| {name} | {r['files']} | {r['bytes'] / compare.MIB:.0f} | {r['local_wall_s']:.2f} "
                     f"| {r['local_mb_s']:.0f} | {r['local_cpu_s']:.2f} | {r['e2e_wall_s']:.2f} | {r['e2e_mb_s']:.0f} "
                     f"| {r['agent_cpu_s']:.2f} | {r['collector_cpu_s']:.2f} "
                     f"| {r['agent_peak_rss_mib']:.0f} | {r['collector_peak_rss_mib']:.0f} | {r['ratio']:.2f} "
                     f"| {r['agent_cpu_ratio']:.2f} "
                     f"| {', '.join(f'{w:.2f}' for w in r['local_walls'])} / "
                     f"{', '.join(f'{w:.2f}' for w in r['e2e_walls'])} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
