#!/usr/bin/env python3
"""Side-by-side benchmark: hubvault's offline engine vs restic and borg.

Same data, same run, same machine.  Python 3.11 standard library only.
See README.md beside this file for how to run it and what it measures.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

GENERATOR_VERSION = 2
KIB = 1024
MIB = 1024 * 1024

SCRIPT_DIR = Path(__file__).resolve().parent
CHECKOUT = SCRIPT_DIR.parent.parent
TOOLS = ("hubvault", "restic", "borg")
STEPS = ("initial", "nochange", "mutation", "restore")
STEP_LABEL = {
    "initial": "initial backup",
    "nochange": "no-change re-backup",
    "mutation": "mutation re-backup",
    "restore": "restore",
}
PASSPHRASE = "compare-bench-passphrase"


def log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! {msg}\n{bar}\n", flush=True)


# --------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------

def _make_lines() -> list[bytes]:
    r = random.Random(12345)
    syl = ["ka", "lo", "ne", "tri", "ver", "sta", "mon", "el", "ix", "or", "un",
           "da", "pe", "qu", "zar", "fi", "gen", "ho", "bul", "wes", "ar", "ti"]
    vocab = ["".join(r.choice(syl) for _ in range(r.randint(1, 4))) for _ in range(4000)]
    vocab += ["ERROR", "WARN", "INFO", "DEBUG", "user", "request", "id=", "ms", "GET", "POST"]
    lines = []
    for i in range(50000):
        words = r.choices(vocab, k=r.randint(3, 14))
        if i % 3 == 0:
            words.insert(0, f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T"
                            f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}")
        lines.append((" ".join(words) + "\n").encode())
    return lines


LINES = _make_lines()


def text_bytes(r: random.Random, n: int) -> bytes:
    """Text-like, compressible (~2.5x with a fast codec), not dedupable across files."""
    if n <= 0:
        return b""
    out = b"".join(r.choices(LINES, k=n // 45 + 8))
    while len(out) < n:
        out += b"".join(r.choices(LINES, k=(n - len(out)) // 45 + 8))
    return out[:n]


def write_text_file(path: Path, r: random.Random, n: int) -> None:
    with open(path, "wb") as f:
        left = n
        while left > 0:
            chunk = text_bytes(r, min(left, 4 * MIB))
            f.write(chunk)
            left -= len(chunk)


def random_with_repeats(r: random.Random, n: int) -> bytes:
    """Mostly random bytes; ~20 % of regions copy an earlier region (dedupable)."""
    buf = bytearray()
    while len(buf) < n:
        ln = r.randint(256 * KIB, 4 * MIB)
        if len(buf) > 8 * MIB and r.random() < 0.2:
            off = r.randrange(0, len(buf) - ln)
            buf += buf[off:off + ln]
        else:
            buf += r.randbytes(ln)
    return bytes(buf[:n])


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------

def set_params(name: str, scale: float) -> dict:
    if name == "mixed":
        return {
            "set": name, "scale": scale, "generator": GENERATOR_VERSION,
            "small_files": max(1, round(20000 * scale)),
            "small_dirs": max(1, round(300 * scale)),
            "medium_files": max(1, round(50 * scale)),
            "big_size": max(MIB, int(200 * MIB * scale)),
        }
    if name == "small":
        return {
            "set": name, "scale": scale, "generator": GENERATOR_VERSION,
            "small_files": max(1, round(200000 * scale)),
            "small_dirs": max(1, round(2000 * scale)),
        }
    raise SystemExit(f"unknown data set {name!r}")


def small_dir(root: Path, name: str, i: int) -> Path:
    if name == "mixed":
        return root / "files" / f"g{i // 20:02d}" / f"d{i:03d}"
    return root / f"g{i // 50:03d}" / f"d{i:04d}"


def small_size(name: str, r: random.Random) -> int:
    if name == "mixed":
        return int(KIB * 64 ** r.random())          # 1–64 KiB, log-uniform (mean ~15 KiB)
    if r.random() < 0.005:
        return 0
    return int(256 * 32 ** r.random())              # 256 B–8 KiB, log-uniform (mean ~2.2 KiB)


def write_small(path: Path, name: str, r: random.Random, size: int) -> None:
    text_share = 0.65 if name == "mixed" else 0.7
    if r.random() < text_share:
        data = text_bytes(r, size)
        path = path.with_suffix(".txt")
    else:
        data = r.randbytes(size)
        path = path.with_suffix(".bin")
    with open(path, "wb") as f:
        f.write(data)


def generate(root: Path, params: dict) -> None:
    name = params["set"]
    r = random.Random(f"hubvault-compare-{name}-{params['scale']}")
    ndirs = params["small_dirs"]
    dirs = [small_dir(root, name, i) for i in range(ndirs)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i in range(params["small_files"]):
        d = dirs[r.randrange(ndirs)]
        write_small(d / f"f{i:06d}", name, r, small_size(name, r))
    if name == "mixed":
        med = root / "medium"
        med.mkdir()
        for i in range(params["medium_files"]):
            size = r.randint(1 * MIB, 10 * MIB)
            if i % 2 == 0:
                write_text_file(med / f"m{i:02d}.txt", r, size)
            else:
                (med / f"m{i:02d}.bin").write_bytes(r.randbytes(size))
        big = root / "big"
        big.mkdir()
        write_text_file(big / "big-text.log", r, params["big_size"])
        (big / "big-random.bin").write_bytes(random_with_repeats(r, params["big_size"]))


def tree_stats(root: Path) -> tuple[int, int, int]:
    files = dirs = total = 0
    for dp, dn, fn in os.walk(root):
        dirs += 1
        for f in fn:
            files += 1
            total += os.lstat(os.path.join(dp, f)).st_size
    return files, dirs, total


def ensure_set(work: Path, params: dict) -> Path:
    """Pristine copy under work/data, reused when its marker matches."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    tag = f"{params['set']}-s{params['scale']:g}"
    root = data / tag
    marker = data / f"{tag}.marker.json"
    if root.is_dir() and marker.is_file():
        try:
            m = json.loads(marker.read_text())
            if m.get("params") == params:
                log(f"reusing generated set {root} ({m['files']} files, {m['bytes'] / MIB:.0f} MiB)")
                return root
        except (ValueError, KeyError):
            pass
    log(f"generating data set {params['set']} at scale {params['scale']:g} into {root}")
    marker.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    tmp = data / f"{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    generate(tmp, params)
    tmp.rename(root)
    files, dirs, total = tree_stats(root)
    marker.write_text(json.dumps({"params": params, "files": files, "dirs": dirs, "bytes": total}))
    log(f"generated {files} files in {dirs} dirs, {total / MIB:.0f} MiB in {time.perf_counter() - t0:.1f}s")
    return root


def mutate(root: Path, params: dict) -> dict:
    """Deterministic small mutation, applied in place to the working copy."""
    name = params["set"]
    scale = params["scale"]
    r = random.Random(f"hubvault-compare-mutation-{name}-{scale}")
    files = []
    for dp, dn, fn in os.walk(root):
        dn.sort()
        for f in sorted(fn):
            files.append(os.path.relpath(os.path.join(dp, f), root))
    files.sort()
    small = [f for f in files if not f.startswith(("big/", "medium/"))]
    n_change = max(1, round(len(small) * 0.01))
    n_del = max(1, round(100 * scale))
    n_add = max(1, round(100 * scale))
    picked = r.sample(small, min(len(small), n_change + n_del))
    changed, deleted = picked[:n_change], picked[n_change:]
    bumped_ns = time.time_ns() + 10**9
    touched = rewritten = 0
    for i, rel in enumerate(changed):
        p = root / rel
        if i % 2 == 0:
            os.utime(p, ns=(bumped_ns, bumped_ns))            # touch: same content, new mtime
            touched += 1
            continue
        data = bytearray(p.read_bytes())
        if data:
            ln = min(len(data), r.randint(64, 1024))
            off = r.randrange(0, len(data) - ln + 1)
            data[off:off + ln] = r.randbytes(ln)
        if i % 4 == 3:
            data += text_bytes(r, 512)
        p.write_bytes(bytes(data))
        os.utime(p, ns=(bumped_ns, bumped_ns))
        rewritten += 1
    for rel in deleted:
        (root / rel).unlink()
    dirs = sorted({str(Path(f).parent) for f in small})
    for i in range(n_add):
        d = root / dirs[r.randrange(len(dirs))]
        write_small(d / f"new{i:05d}", name, r, small_size(name, r))
    grown = 0
    for rel in files:
        if rel.startswith("big/") or (rel.startswith("medium/") and r.random() < 0.1):
            p = root / rel
            data = p.read_bytes()
            ins = r.randbytes(r.randint(100, 10000))
            mid = len(data) // 2 + r.randrange(-4096, 4096)
            mid = max(0, min(len(data), mid))
            app = r.randbytes(64 * KIB) if rel.endswith(".bin") else text_bytes(r, 64 * KIB)
            if rel.startswith("big/"):
                new = data[:mid] + ins + data[mid:] + app
            else:
                new = data + app[:4 * KIB]
            p.write_bytes(new)
            grown += 1
    return {"touched": touched, "rewritten": rewritten, "deleted": len(deleted),
            "added": n_add, "large_files_changed": grown}


# --------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------

def du_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def warm(*paths: Path) -> None:
    buf = bytearray(1 * MIB)
    view = memoryview(buf)
    for root in paths:
        if not root.exists():
            continue
        for dp, dn, fn in os.walk(root):
            for f in fn:
                p = os.path.join(dp, f)
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    while os.readv(fd, [view]) > 0:
                        pass
                finally:
                    os.close(fd)


def rustc_count() -> int:
    out = subprocess.run(["pgrep", "-c", "rustc"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip() or 0)
    except ValueError:
        return 0


def cpu_busy_pct(interval: float = 1.0) -> float:
    """Share of all cores busy over `interval` seconds (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    t1, i1 = sample()
    time.sleep(interval)
    t2, i2 = sample()
    return round(100.0 * (1 - (i2 - i1) / max(1, t2 - t1)), 1)


def quiet_machine(limit: float) -> dict:
    """Wait (bounded) until no rustc runs and the machine is mostly idle."""
    t0 = time.monotonic()
    n = rustc_count()
    busy = cpu_busy_pct()
    first_n, first_busy = n, busy
    while (n > 0 or busy > 35) and time.monotonic() - t0 < limit:
        time.sleep(3)
        n = rustc_count()
        busy = cpu_busy_pct()
    waited = time.monotonic() - t0
    if n > 0 or busy > 35:
        log(f"  WARNING: proceeding while {n} rustc process(es) run, machine {busy:.0f}% busy "
            f"(waited {waited:.0f}s)")
    elif waited > 2:
        log(f"  waited {waited:.0f}s for a quiet machine ({first_n} rustc, {first_busy:.0f}% busy)")
    return {"rustc_at_start": n, "rustc_waited_s": round(waited, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2), "cpu_busy_pct_before": busy}


# A child's ru_maxrss starts at the high-water RSS of the process it was
# spawned from (vfork + exec carries the parent's peak over).  The harness
# grows to hundreds of MiB while generating data, so tools are started by a
# tiny spawner process, started early, that fork()s (not vfork) and wait4()s.
# Its own RSS (~10 MiB) is the floor of what can be reported.
SPAWNER_SRC = r"""
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            if req["cwd"]:
                os.chdir(req["cwd"])
            nul = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nul, 0); os.dup2(out, 1); os.dup2(err, 2)
            os.execvpe(req["cmd"][0], req["cmd"], req["env"])
        except BaseException as e:
            os.write(2, ("spawn failed: %r\n" % (e,)).encode())
        os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    os.close(out); os.close(err)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall,
                      "utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kib": ru.ru_maxrss}),
          flush=True)
"""


class Spawner:
    _proc = None

    @classmethod
    def start(cls) -> None:
        if cls._proc is None:
            cls._proc = subprocess.Popen([sys.executable, "-S", "-c", SPAWNER_SRC],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @classmethod
    def run(cls, cmd, env, cwd, stdout_path, stderr_path) -> dict:
        cls.start()
        req = {"cmd": [str(c) for c in cmd], "env": env, "cwd": str(cwd) if cwd else None,
               "stdout": str(stdout_path), "stderr": str(stderr_path)}
        cls._proc.stdin.write(json.dumps(req) + "\n")
        cls._proc.stdin.flush()
        line = cls._proc.stdout.readline()
        if not line:
            raise RuntimeError("spawner died")
        return json.loads(line)

    @classmethod
    def floor_mib(cls) -> float:
        r = cls.run(["true"], dict(os.environ), None, os.devnull, os.devnull)
        return round(r["maxrss_kib"] / 1024, 1)


def run_timed(cmd: list[str], env: dict, log_path: Path, cwd: Path | None = None) -> dict:
    with open(log_path, "ab") as lf:
        lf.write(f"\n$ {' '.join(cmd)}  (cwd={cwd})\n".encode())
    out_path = log_path.with_suffix(".stdout")
    r = Spawner.run(cmd, env, cwd, out_path, log_path)
    stdout = out_path.read_text(errors="replace")
    with open(log_path, "a") as lf:
        lf.write(stdout[-20000:])
        lf.write(f"\n[exit {r['rc']}, wall {r['wall']:.3f}s]\n")
    return {
        "rc": r["rc"],
        "wall_s": round(r["wall"], 3),
        "cpu_s": round(r["utime"] + r["stime"], 3),
        "user_s": round(r["utime"], 3),
        "sys_s": round(r["stime"], 3),
        "peak_rss_mib": round(r["maxrss_kib"] / 1024, 1),
        "stdout": stdout,
    }


def stderr_tail(log_path: Path, n: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------

def ensure_tools(install: bool) -> None:
    missing = [pkg for exe, pkg in (("restic", "restic"), ("borg", "borgbackup"))
               if shutil.which(exe) is None]
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing tools: {missing} (run without --no-install)")
    log(f"installing {missing} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


class Tool:
    name = ""

    def __init__(self, work: Path, set_name: str):
        self.repo = work / "repos" / set_name / self.name
        self.logs = work / "logs" / set_name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logs / f"{self.name}.log"
        self.cache = work / "cache" / set_name / self.name
        self.env = dict(os.environ)
        self.ok = True

    def reset(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)

    def init(self) -> None:
        res = run_timed(self.init_cmd(), self.env, self.log_path)
        if res["rc"] != 0:
            raise RuntimeError(f"{self.name} init failed (exit {res['rc']}):\n{stderr_tail(self.log_path)}")

    def success(self, rc: int) -> tuple[bool, str | None]:
        return rc == 0, None

    def restored_root(self, target: Path, src: Path) -> Path:
        return target / str(src).lstrip("/")


class Hubvault(Tool):
    name = "hubvault"

    def __init__(self, work: Path, set_name: str, binary: Path):
        super().__init__(work, set_name)
        self.bin = str(binary)
        self.env["HUBVAULT_PASSPHRASE"] = PASSPHRASE
        self.env.pop("HUBVAULT_REPO", None)
        self.env.pop("HUBVAULT_PASSPHRASE_FILE", None)

    def init_cmd(self):
        return [self.bin, "repo", "init", "--repo", str(self.repo)]

    def backup_cmd(self, src: Path, step: str):
        return [self.bin, "repo", "backup", "--repo", str(self.repo), "--json", str(src)]

    def restore(self, target: Path, src: Path):
        return [self.bin, "repo", "restore", "--repo", str(self.repo), "latest",
                "--target", str(target)], None

    def success(self, rc):
        if rc == 3:
            return True, "exit 3: partial backup (some files unreadable)"
        return rc == 0, None

    def restored_root(self, target, src):
        return target / src.name

    def parse(self, stdout: str) -> dict | None:
        try:
            snap = json.loads(stdout)
            return {"id": snap.get("id"), "stats": snap.get("stats"),
                    "issues": snap.get("issues"), "parent": snap.get("parent")}
        except ValueError:
            return None


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path, set_name: str):
        super().__init__(work, set_name)
        self.env["RESTIC_PASSWORD"] = PASSPHRASE
        self.env["RESTIC_CACHE_DIR"] = str(self.cache)
        self.env.pop("RESTIC_REPOSITORY", None)
        init_help = subprocess.run(["restic", "init", "--help"], capture_output=True, text=True).stdout
        backup_help = subprocess.run(["restic", "backup", "--help"], capture_output=True, text=True).stdout
        self.repo_v2 = "--repository-version" in init_help
        self.compression = "--compression" in backup_help and self.repo_v2

    def init_cmd(self):
        cmd = ["restic", "-r", str(self.repo), "init"]
        if self.repo_v2:
            cmd += ["--repository-version", "2"]
        return cmd

    def backup_cmd(self, src, step):
        cmd = ["restic", "-r", str(self.repo), "backup", "--json", "--host", "bench"]
        if self.compression:
            cmd += ["--compression", "auto"]
        return cmd + [str(src)]

    def restore(self, target, src):
        return ["restic", "-r", str(self.repo), "restore", "latest", "--host", "bench",
                "--target", str(target)], None

    def parse(self, stdout):
        for line in reversed(stdout.splitlines()):
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if m.get("message_type") == "summary":
                return m
        return None


class Borg(Tool):
    name = "borg"

    def __init__(self, work: Path, set_name: str):
        super().__init__(work, set_name)
        self.env["BORG_PASSPHRASE"] = PASSPHRASE
        self.env["BORG_BASE_DIR"] = str(self.cache)
        self.env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        self.env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] = "yes"
        self.env.pop("BORG_REPO", None)

    def init_cmd(self):
        return ["borg", "init", "-e", "repokey", str(self.repo)]

    def backup_cmd(self, src, step):
        return ["borg", "create", "--json", "--compression", "lz4",
                f"{self.repo}::{step}", str(src)]

    def restore(self, target, src):
        return ["borg", "extract", f"{self.repo}::mutation"], target

    def parse(self, stdout):
        try:
            m = json.loads(stdout)
            return {"archive_stats": m.get("archive", {}).get("stats"),
                    "cache_stats": m.get("cache", {}).get("stats")}
        except ValueError:
            return None


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------

class FreshFs:
    """A new ext4 file system on a loop device, made for one tool's timed restore.

    Restoring into a directory of the shared file system is unfair to whoever
    restores second: ext4 skips inodes freed in the last minutes when it
    allocates (a scan of the inode tables per new file, seen as 5-14 s of
    system time for 20k files), so a restore right after another tool's tree
    or the previous data set was deleted pays for that deletion. A fresh file
    system per restore inherits nothing. The loop device uses direct I/O on
    its backing file so the data is not cached twice. Needs root and
    e2fsprogs; without them the script falls back to plain directories.
    """

    def __init__(self, image: Path, mount: Path, size_bytes: int, inodes: int):
        self.image, self.mount = image, mount
        self.size_bytes, self.inodes = size_bytes, inodes
        self.dev: str | None = None

    @staticmethod
    def available() -> bool:
        return (os.geteuid() == 0
                and all(shutil.which(t) for t in ("mkfs.ext4", "losetup", "mount", "umount")))

    def create(self) -> Path:
        self.destroy()
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size_bytes)
        # Inode tables and journal initialised now, not by ext4lazyinit in the
        # background of the timed restore.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(self.inodes),
                        "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.image)],
                       check=True)
        self.dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(self.image)],
                                  check=True, capture_output=True, text=True).stdout.strip()
        self.mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", self.dev, str(self.mount)], check=True)
        return self.mount

    def destroy(self) -> None:
        if self.dev is not None:
            subprocess.run(["umount", str(self.mount)], check=False)
            subprocess.run(["losetup", "-d", self.dev], check=False)
            self.dev = None
        if self.image.exists():
            self.image.unlink()


def manifest(root: Path) -> dict:
    files: dict[str, tuple[int, str, int]] = {}
    dirs: set[str] = set()
    for dp, dn, fn in os.walk(root):
        rel_dir = os.path.relpath(dp, root)
        dirs.add(rel_dir)
        for f in fn:
            p = os.path.join(dp, f)
            st = os.lstat(p)
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if not os.path.isfile(p) or os.path.islink(p):
                files[rel] = (-1, "non-regular", 0)
                continue
            with open(p, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files[rel] = (st.st_size, digest, st.st_mtime_ns)
    return {"files": files, "dirs": dirs}


def compare_trees(src: dict, dst: dict) -> dict:
    sf, df = src["files"], dst["files"]
    missing = sorted(set(sf) - set(df))
    extra = sorted(set(df) - set(sf))
    differ = sorted(k for k in set(sf) & set(df) if sf[k][:2] != df[k][:2])
    mtime = sum(1 for k in set(sf) & set(df) if sf[k][2] // 10**9 != df[k][2] // 10**9)
    missing_dirs = sorted(src["dirs"] - dst["dirs"])
    ok = not (missing or extra or differ or missing_dirs)
    return {"ok": ok, "files_checked": len(sf), "missing": len(missing), "extra": len(extra),
            "content_differs": len(differ), "missing_dirs": len(missing_dirs),
            "mtime_differs_s": mtime,
            "examples": (missing[:5] + extra[:5] + differ[:5] + missing_dirs[:5])}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

TIMING_KEYS = ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_mib", "others_cores",
               "rustc_at_start", "cpu_busy_pct_before", "loadavg_1m")


def busy_seconds() -> float:
    """CPU seconds spent busy (all cores, excluding idle and iowait) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def copy_state(paths: list[Path], dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for i, p in enumerate(paths):
        if p.exists():
            subprocess.run(["cp", "-a", str(p), str(dest / str(i))], check=True)


def put_back_state(paths: list[Path], saved: Path) -> None:
    for i, p in enumerate(paths):
        shutil.rmtree(p, ignore_errors=True)
        if (saved / str(i)).exists():
            subprocess.run(["cp", "-a", str(saved / str(i)), str(p)], check=True)


def timed_step(tool: Tool, step: str, cmd: list[str], cwd: Path | None,
               args, warm_paths: list[Path], work: Path, reset_target=None) -> dict:
    """Run one step; if other processes ate CPU meanwhile, put the state back and retry."""
    saved = work / "state" / tool.name
    state_paths = [tool.repo, tool.cache]
    retries = args.retries
    if step != "restore" and retries > 0:
        copy_state(state_paths, saved)
    attempts = []
    for attempt in range(1 + retries):
        if attempt > 0:
            if step == "restore":
                reset_target()
            else:
                put_back_state(state_paths, saved)
        subprocess.run(["sync"])
        warm(*warm_paths)
        env_note = quiet_machine(args.wait_rustc)
        log(f"  {tool.name:8s} {STEP_LABEL[step]} ..." + (f" (attempt {attempt + 1})" if attempt else ""))
        before = du_bytes(tool.repo)
        b0 = busy_seconds()
        res = run_timed(cmd, tool.env, tool.log_path, cwd=cwd)
        b1 = busy_seconds()
        others = max(0.0, (b1 - b0) - res["cpu_s"])
        res["others_cores"] = round(others / max(res["wall_s"], 1e-3), 2)
        res["contended"] = res["others_cores"] > args.contended
        ok, warn = tool.success(res["rc"])
        res.update(env_note)
        res["repo_bytes"] = du_bytes(tool.repo)
        res["repo_growth_bytes"] = res["repo_bytes"] - before
        stdout = res.pop("stdout")
        if step != "restore":
            res["tool_report"] = tool.parse(stdout)
        res["ok"] = ok
        attempts.append({k: res[k] for k in TIMING_KEYS})
        log(f"  {tool.name:8s} {STEP_LABEL[step]}: {res['wall_s']:.2f}s wall, {res['cpu_s']:.2f}s cpu, "
            f"{res['peak_rss_mib']:.0f} MiB rss, repo {res['repo_bytes'] / MIB:.1f} MiB, "
            f"other processes used {res['others_cores']:.2f} cores meanwhile")
        if not ok or not res["contended"] or attempt == retries:
            break
        log(f"  {tool.name} {STEP_LABEL[step]} was contended; putting the state back and retrying")
    res["attempts"] = attempts
    if ok and len(attempts) > 1:
        # Report the fastest attempt (the least disturbed); the state is the last one's,
        # which holds the same content.
        clean = [a for a in attempts if a["others_cores"] <= args.contended]
        best = min(clean or attempts, key=lambda a: a["wall_s"])
        res.update({k: best[k] for k in TIMING_KEYS})
        res["contended"] = best["others_cores"] > args.contended
        res["reported_attempt"] = attempts.index(best) + 1
    shutil.rmtree(saved, ignore_errors=True)
    if warn:
        res["warning"] = warn
        log(f"  WARNING {tool.name}: {warn}")
    if not ok:
        res["error"] = stderr_tail(tool.log_path)
        msg = f"{tool.name} {STEP_LABEL[step]} FAILED (exit {res['rc']}):\n{res['error']}"
        if tool.name == "hubvault":
            loud(msg)
        else:
            log("  " + msg)
    return res


def run_set(name: str, args, work: Path, hv_bin: Path) -> dict:
    params = set_params(name, args.scale)
    pristine = ensure_set(work, params)
    src_parent = work / "src"
    src_parent.mkdir(parents=True, exist_ok=True)
    src = src_parent / name
    shutil.rmtree(src, ignore_errors=True)
    log(f"copying {pristine} -> {src}")
    subprocess.run(["cp", "-a", str(pristine), str(src)], check=True)
    files, dirs, total = tree_stats(src)
    result = {"params": params, "files": files, "dirs": dirs, "bytes": total,
              "steps": {t: {} for t in args.tools}, "verify": {}}

    tools: list[Tool] = []
    for t in args.tools:
        if t == "hubvault":
            tools.append(Hubvault(work, name, hv_bin))
        elif t == "restic":
            tools.append(Restic(work, name))
        elif t == "borg":
            tools.append(Borg(work, name))

    for tool in tools:
        tool.reset()
        try:
            tool.init()
        except RuntimeError as e:
            tool.ok = False
            result["steps"][tool.name]["init_error"] = str(e)
            (loud if tool.name == "hubvault" else log)(str(e))
            continue
        result["repo_after_init_bytes"] = du_bytes(tool.repo)
        for step in ("initial", "nochange"):
            res = timed_step(tool, step, tool.backup_cmd(src, step), None, args,
                             [src, tool.repo], work)
            result["steps"][tool.name][step] = res
            if not res["ok"] and step == "initial":
                tool.ok = False
                break

    log(f"applying the mutation to {src}")
    result["mutation"] = mutate(src, params)
    log(f"  mutation: {result['mutation']}")
    files, dirs, total = tree_stats(src)
    result["after_mutation"] = {"files": files, "dirs": dirs, "bytes": total}

    for tool in tools:
        if not tool.ok:
            continue
        res = timed_step(tool, "mutation", tool.backup_cmd(src, "mutation"), None, args,
                         [src, tool.repo], work)
        result["steps"][tool.name]["mutation"] = res
        if not res["ok"]:
            tool.ok = False

    log("hashing the mutated source tree for verification")
    src_manifest = manifest(src)
    restore_parent = work / "restore"
    fresh = args.restore_fs == "fresh"
    result["restore_fs"] = "a fresh ext4 per tool (loop device)" if fresh else f"directories under {restore_parent}"
    # Without fresh file systems, restored trees are removed only after every
    # tool restored (see FreshFs for why a deletion slows the next restore).
    restored: list[Path] = []
    for tool in tools:
        if not tool.ok:
            continue
        if fresh:
            fs = FreshFs(work / "restore-fs.img", restore_parent / name / tool.name,
                         size_bytes=max(4 << 30, 3 * total + files * 8192),
                         inodes=2 * (files + dirs) + 10000)
            target = fs.create()

            def reset_target(fs=fs):
                fs.create()
        else:
            fs = None
            target = restore_parent / name / tool.name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)

            def reset_target(target=target):
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
        try:
            cmd, cwd = tool.restore(target, src)
            res = timed_step(tool, "restore", cmd, cwd, args, [tool.repo], work,
                             reset_target=reset_target)
            result["steps"][tool.name]["restore"] = res
            root = tool.restored_root(target, src)
            if res["ok"]:
                if root.is_dir():
                    v = compare_trees(src_manifest, manifest(root))
                else:
                    v = {"ok": False, "error": f"restored root {root} not found; target holds "
                                               f"{sorted(os.listdir(target))[:10]}"}
                result["verify"][tool.name] = v
                if v["ok"]:
                    log(f"  {tool.name} restore verified: {v['files_checked']} files byte for byte"
                        + (f" ({v['mtime_differs_s']} mtimes differ)" if v.get("mtime_differs_s") else ""))
                else:
                    msg = f"{tool.name} RESTORE MISMATCH: {json.dumps(v)}"
                    (loud if tool.name == "hubvault" else log)(msg)
        finally:
            if fs is not None:
                fs.destroy()
            else:
                restored.append(target)

    for target in restored:
        log(f"  removing {target}")
        shutil.rmtree(target, ignore_errors=True)
    for tool in tools:
        result["steps"][tool.name]["final_repo_bytes"] = du_bytes(tool.repo)
        result["steps"][tool.name]["cache_bytes"] = du_bytes(tool.cache)
    if not args.keep:
        for tool in tools:
            shutil.rmtree(tool.repo, ignore_errors=True)
            shutil.rmtree(tool.cache, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return result


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _get(res: dict, tool: str, step: str, key: str):
    s = res["steps"].get(tool, {}).get(step)
    if not s or not s.get("ok"):
        return None
    return s.get(key)


def ratio(other, mine):
    if other is None or mine is None or mine <= 0:
        return None
    return other / mine


def fmt(v, spec=".2f", suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def goals(res: dict, tools: list[str]) -> list[dict]:
    out = []

    def add(desc, val, target, higher_better=True):
        if val is None:
            out.append({"goal": desc, "value": None, "target": target, "met": None})
            return
        met = val >= target if higher_better else val <= target
        out.append({"goal": desc, "value": round(val, 3), "target": target, "met": met})

    hv = "hubvault"
    if hv not in tools:
        return out
    if "restic" in tools:
        add("initial backup ≥ 2.5× faster than restic",
            ratio(_get(res, "restic", "initial", "wall_s"), _get(res, hv, "initial", "wall_s")), 2.5)
    if "borg" in tools:
        add("initial backup ≥ 2× faster than borg",
            ratio(_get(res, "borg", "initial", "wall_s"), _get(res, hv, "initial", "wall_s")), 2.0)
    if "restic" in tools:
        add("no-change re-backup ≥ 4× faster than restic",
            ratio(_get(res, "restic", "nochange", "wall_s"), _get(res, hv, "nochange", "wall_s")), 4.0)
        add("mutation re-backup ≥ 3× faster than restic",
            ratio(_get(res, "restic", "mutation", "wall_s"), _get(res, hv, "mutation", "wall_s")), 3.0)
        add("mutation adds no more than restic's (restic growth / hubvault growth)",
            ratio(_get(res, "restic", "mutation", "repo_growth_bytes"),
                  _get(res, hv, "mutation", "repo_growth_bytes")), 1.0)
        add("restore ≥ 2.5× faster than restic",
            ratio(_get(res, "restic", "restore", "wall_s"), _get(res, hv, "restore", "wall_s")), 2.5)
        add("repository no larger than restic's (restic size / hubvault size)",
            ratio(res["steps"]["restic"].get("final_repo_bytes"),
                  res["steps"][hv].get("final_repo_bytes")), 1.0)
        hv_rss = [_get(res, hv, s, "peak_rss_mib") for s in STEPS]
        rs_rss = [_get(res, "restic", s, "peak_rss_mib") for s in STEPS]
        hv_rss = [v for v in hv_rss if v is not None]
        rs_rss = [v for v in rs_rss if v is not None]
        if hv_rss and rs_rss:
            add("peak RSS under restic's (restic max / hubvault max, all steps)",
                max(rs_rss) / max(hv_rss), 1.0 + 1e-9)
    return out


def render_table(name: str, res: dict, tools: list[str]) -> list[str]:
    head = ["step"]
    for t in tools:
        head += [f"{t} wall s", f"{t} CPU s", f"{t} RSS MiB"]
    others = [t for t in tools if t != "hubvault"]
    if "hubvault" in tools:
        head += [f"hv vs {t}" for t in others]
    rows = []
    for step in STEPS:
        row = [STEP_LABEL[step]]
        for t in tools:
            row += [fmt(_get(res, t, step, "wall_s")), fmt(_get(res, t, step, "cpu_s")),
                    fmt(_get(res, t, step, "peak_rss_mib"), ".0f")]
        if "hubvault" in tools:
            hvw = _get(res, "hubvault", step, "wall_s")
            row += [fmt(ratio(_get(res, t, step, "wall_s"), hvw), ".2f", "×") for t in others]
        rows.append(row)
    row = ["repo size MiB (final)"]
    for t in tools:
        row += [fmt(res["steps"][t].get("final_repo_bytes", 0) / MIB, ".1f"), "", ""]
    if "hubvault" in tools:
        hvs = res["steps"]["hubvault"].get("final_repo_bytes")
        row += [fmt(ratio(res["steps"][t].get("final_repo_bytes"), hvs), ".2f", "× size")
                for t in others]
    rows.append(row)
    row = ["mutation growth MiB"]
    for t in tools:
        g = _get(res, t, "mutation", "repo_growth_bytes")
        row += [fmt(None if g is None else g / MIB, ".2f"), "", ""]
    if "hubvault" in tools:
        hvg = _get(res, "hubvault", "mutation", "repo_growth_bytes")
        row += [fmt(ratio(_get(res, t, "mutation", "repo_growth_bytes"), hvg), ".2f", "× size")
                for t in others]
    rows.append(row)
    return [head] + rows


def to_markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |",
             "|" + "|".join("---" for _ in table[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(lines)


def to_text(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    out = []
    for j, r in enumerate(table):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def report(results: dict, tools: list[str]) -> tuple[str, str]:
    meta = results["meta"]
    text, md = [], []
    md.append(f"# hubvault vs restic vs borg — {meta['date']}\n")
    md.append(f"- machine: {meta['cpus']} cores, {meta['mem_gib']} GiB, {meta['platform']}")
    md.append(f"- hubvault: {meta['versions'].get('hubvault')} (checkout {meta.get('git_head')}, "
              f"binary sha256 {meta.get('hubvault_sha256', '')[:16]})")
    md.append(f"- restic: {meta['versions'].get('restic')} ({meta.get('restic_flags')})")
    md.append(f"- borg: {meta['versions'].get('borg')} (repokey, lz4)")
    md.append(f"- scale {meta['scale']:g}; warm cache; one run; ratio = other wall time / hubvault wall time "
              f"(size rows: other size / hubvault size, > 1 means hubvault is smaller); "
              f"peak RSS is the child's ru_maxrss (floor {meta.get('rss_floor_mib')} MiB); "
              f"restores go to " + ("a fresh ext4 file system per tool (loop device, direct I/O)"
                                    if meta.get("restore_fs") == "fresh" else "plain directories")
              + "\n")
    text += ["  " + line[2:] for line in md[1:]]
    for name, res in results["sets"].items():
        table = render_table(name, res, tools)
        title = (f"{name}: {res['files']} files, {res['dirs']} dirs, {res['bytes'] / MIB:.0f} MiB "
                 f"(after mutation {res['after_mutation']['files']} files, "
                 f"{res['after_mutation']['bytes'] / MIB:.0f} MiB)")
        md.append(f"## {title}\n")
        md.append(to_markdown(table))
        text.append(f"\n=== {title}\n{to_text(table)}")
        notes = []
        for t in tools:
            for step in STEPS:
                s = res["steps"].get(t, {}).get(step)
                if not s:
                    continue
                if s.get("rustc_at_start"):
                    notes.append(f"{t} {STEP_LABEL[step]} ran while {s['rustc_at_start']} rustc process(es) ran "
                                 f"(load {s['loadavg_1m']})")
                if s.get("contended"):
                    notes.append(f"{t} {STEP_LABEL[step]}: CONTENDED, other processes used "
                                 f"{s['others_cores']:.2f} cores during the best of "
                                 f"{len(s['attempts'])} attempt(s)")
                elif len(s.get("attempts", [])) > 1:
                    notes.append(f"{t} {STEP_LABEL[step]}: attempt {s.get('reported_attempt')} of "
                                 f"{len(s['attempts'])} reported (others were contended)")
                if s.get("warning"):
                    notes.append(f"{t} {STEP_LABEL[step]}: {s['warning']}")
                if not s.get("ok"):
                    notes.append(f"{t} {STEP_LABEL[step]} FAILED (exit {s['rc']}): "
                                 + (s.get('error') or '').strip().splitlines()[-1:].__str__())
            if res["steps"].get(t, {}).get("init_error"):
                notes.append(f"{t} init failed: {res['steps'][t]['init_error']}")
        for t, v in res["verify"].items():
            if v.get("ok"):
                notes.append(f"{t} restore verified byte for byte ({v['files_checked']} files"
                             + (f"; {v['mtime_differs_s']} mtimes differ" if v.get('mtime_differs_s') else "")
                             + ")")
            else:
                notes.append(f"**{t} RESTORE MISMATCH**: {json.dumps(v)}")
        g = res.get("goals", [])
        if g:
            md.append("\nGoals (hubvault):\n")
            text.append("\nGoals (hubvault):")
            for x in g:
                mark = {True: "MET", False: "MISSED", None: "n/a"}[x["met"]]
                line = f"{mark:6s} {x['goal']}: {fmt(x['value'], '.2f')} (target {x['target']:g})"
                md.append(f"- {line}")
                text.append(f"  {line}")
        if notes:
            md.append("\nNotes:\n")
            md += [f"- {n}" for n in notes]
            text.append("Notes:")
            text += [f"  {n}" for n in notes]
        md.append("")
    return "\n".join(text), "\n".join(md)


def strip_for_json(results: dict) -> dict:
    return json.loads(json.dumps(results, default=str))


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/hubvault-compare", help="work dir (outside the checkout)")
    ap.add_argument("--scale", type=float, default=1.0, help="data-set scale (0.1 for a quick run)")
    ap.add_argument("--sets", default="mixed,small", help="comma list of: mixed, small")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of: hubvault, restic, borg")
    ap.add_argument("--out", default=str(SCRIPT_DIR / "results" / "latest"),
                    help="output path prefix; writes PREFIX.md and PREFIX.json")
    ap.add_argument("--hubvault", default=str(CHECKOUT / "target" / "release" / "hubvault"),
                    help="hubvault binary (copied into the work dir at start)")
    ap.add_argument("--wait-rustc", type=float, default=120.0,
                    help="seconds to wait for running rustc processes before each step")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a step (state put back) when other processes used CPU meanwhile")
    ap.add_argument("--contended", type=float, default=0.3,
                    help="cores used by other processes during a step above which it is retried")
    ap.add_argument("--restore-fs", choices=("fresh", "dir"), default=None,
                    help="restore each tool onto a fresh loop-mounted ext4 (default when root "
                         "with e2fsprogs) or into plain directories")
    ap.add_argument("--keep", action="store_true", help="keep repositories and the working copy")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install restic/borg")
    args = ap.parse_args()
    if args.restore_fs is None:
        args.restore_fs = "fresh" if FreshFs.available() else "dir"
    elif args.restore_fs == "fresh" and not FreshFs.available():
        raise SystemExit("--restore-fs fresh needs root and mkfs.ext4, losetup, mount, umount")
    Spawner.start()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for t in args.tools:
        if t not in TOOLS:
            raise SystemExit(f"unknown tool {t!r}")

    work = Path(args.work).resolve()
    if work == CHECKOUT or CHECKOUT in work.parents:
        raise SystemExit(f"--work {work} is inside the checkout {CHECKOUT}; pick a dir outside it")
    work.mkdir(parents=True, exist_ok=True)

    if "restic" in args.tools or "borg" in args.tools:
        ensure_tools(not args.no_install)

    hv_bin = work / "bin" / "hubvault"
    meta_extra = {}
    if "hubvault" in args.tools:
        src_bin = Path(args.hubvault)
        if not src_bin.is_file():
            raise SystemExit(f"hubvault binary {src_bin} not found (cargo build --release -p admin-cli)")
        hv_bin.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_bin, hv_bin)
        meta_extra["hubvault_sha256"] = hashlib.sha256(hv_bin.read_bytes()).hexdigest()
        meta_extra["hubvault_binary_mtime"] = datetime.datetime.fromtimestamp(
            src_bin.stat().st_mtime).isoformat(timespec="seconds")

    git = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    versions = {}
    if "hubvault" in args.tools:
        versions["hubvault"] = first_line([str(hv_bin), "--version"])
    if "restic" in args.tools:
        versions["restic"] = first_line(["restic", "version"])
    if "borg" in args.tools:
        versions["borg"] = first_line(["borg", "--version"])
    restic_flags = ""
    if "restic" in args.tools:
        r = Restic(work, "probe")
        restic_flags = ("repo v2, --compression auto" if r.compression
                        else "repo v1, no compression")
        shutil.rmtree(work / "logs" / "probe", ignore_errors=True)
    rss_floor = Spawner.floor_mib()
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    results = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "mem_gib": mem_gib,
            "platform": platform.platform(), "scale": args.scale, "sets": sets,
            "tools": args.tools, "work": str(work), "versions": versions,
            "restic_flags": restic_flags, "rss_floor_mib": rss_floor,
            "restore_fs": args.restore_fs,
            "git_head": (git.stdout.strip() or "?") + ("-dirty" if dirty.stdout.strip() else ""),
            **meta_extra,
        },
        "sets": {},
    }
    log(f"versions: {versions}")

    failures = 0
    for name in sets:
        log(f"===== data set {name} =====")
        res = run_set(name, args, work, hv_bin)
        res["goals"] = goals(res, args.tools)
        results["sets"][name] = res
        hv = res["steps"].get("hubvault", {})
        if "hubvault" in args.tools:
            if hv.get("init_error") or any(not hv.get(s, {}).get("ok", False) for s in STEPS):
                failures += 1
            if not res["verify"].get("hubvault", {}).get("ok", False):
                failures += 1

    text, md = report(results, args.tools)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps(strip_for_json(results), indent=2) + "\n")
    print("\n" + text + "\n", flush=True)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    if failures:
        loud(f"hubvault had {failures} failure(s) or mismatch(es); see above and {work}/logs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
