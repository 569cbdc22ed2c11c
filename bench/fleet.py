#!/usr/bin/env python3
"""Two hosts on JuiceFS: side-by-side throughput of four filesystems on one JuiceFS
volume, measured on host 1 of a fleet built by scripts/fleet-juicefs.sh (docs/SHARING.md).

Systems (all backed by the same JuiceFS volume, all measured on host 1):
  raw      raw JuiceFS mount                               $FLEET_DIR/h1/jfs/bench-raw
  single   envelopefs single-host volume (init w/o --shared) mounted at $FLEET_DIR/h1/efs-single
  shared   envelopefs shared volume (init --shared), mounted on host 1 AND host 2
  gocrypt  gocryptfs -sharedstorage (host 1 only)

Workloads (each timed inside host 1 by a worker process, `fleet-juicefs.sh run 1 python3 THIS _worker`):
  seqwrite   64 MiB sequential write in 1 MiB writes + fsync + close            -> MiB/s
  seqread    same file after `sync; echo 3 > /proc/sys/vm/drop_caches`           -> MiB/s
  smallfiles 500 new files x 4 KiB (open/write/close), then syncfs() of the fs     -> files/s
  randwrite  2000 random 4 KiB-aligned pwrite()s into a 16 MiB file, one fsync    -> ops/s
             (the 16 MiB file is written and fsynced before the timer starts)

Rounds interleave systems: raw single shared gocrypt raw single shared gocrypt ...
Reports medians and ratios vs raw JuiceFS and vs gocryptfs; raw samples go to --json.

Usage, as root (the FLEET_* variables as for fleet-juicefs.sh):
  python3 bench/fleet.py --fleet-up --fleet-down [--rounds 3] \
      [--envelopefs target/release/envelopefs] [--json bench/results/fleet.json]
--fleet-up runs `fleet-juicefs.sh up` first (wipes the volume); --fleet-down runs `down` at the end
(also on failure). Without them the fleet must already be up; the script mounts and unmounts
only what it made itself.
"""
import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
# Files of the run that are not results (the key, the gocryptfs password): beside the fleet.
WORK = os.environ.get("FLEET_DIR", "/tmp/fleet")
SYSTEMS = ["raw", "single", "shared", "gocrypt"]
LABEL = {
    "raw": "raw JuiceFS",
    "single": "envelopefs single-host",
    "shared": "envelopefs shared (h2 mounted)",
    "gocrypt": "gocryptfs -sharedstorage",
}
WORKLOADS = ["seqwrite", "seqread", "smallfiles", "randwrite"]
UNIT = {"seqwrite": "MiB/s", "seqread": "MiB/s", "smallfiles": "files/s", "randwrite": "ops/s"}
MiB = 1 << 20


# ----------------------------------------------------------------------------- worker side
SYNC_ERRORS = []


def _syncfs(path):
    """syncfs(2) on path's filesystem. An error is recorded and reported by the driver, not
    raised, so that one system's failure does not end the others' run."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            SYNC_ERRORS.append(f"syncfs({os.path.basename(path)}): {os.strerror(e)}")
    finally:
        os.close(fd)


def _drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def worker(d, wl, seed):
    os.makedirs(d, exist_ok=True)
    big = os.path.join(d, "seq.bin")
    if wl == "seqwrite":
        buf = os.urandom(MiB)
        if os.path.exists(big):
            os.unlink(big)
        _syncfs(d)
        t = time.perf_counter()
        fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(64):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        dt = time.perf_counter() - t
        return {"value": 64 / dt, "secs": dt}
    if wl == "seqread":
        _drop_caches()
        t = time.perf_counter()
        fd = os.open(big, os.O_RDONLY)
        n = 0
        while True:
            b = os.read(fd, MiB)
            if not b:
                break
            n += len(b)
        os.close(fd)
        dt = time.perf_counter() - t
        if n != 64 * MiB:
            raise SystemExit(f"seqread: read {n} bytes, expected {64 * MiB}")
        return {"value": n / MiB / dt, "secs": dt}
    if wl == "smallfiles":
        sd = os.path.join(d, "small")
        if os.path.exists(sd):
            for name in os.listdir(sd):
                os.unlink(os.path.join(sd, name))
            os.rmdir(sd)
        os.mkdir(sd)
        _syncfs(d)
        buf = os.urandom(4096)
        t = time.perf_counter()
        for i in range(500):
            fd = os.open(os.path.join(sd, f"f{i:04d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, buf)
            os.close(fd)
        _syncfs(sd)
        dt = time.perf_counter() - t
        return {"value": 500 / dt, "secs": dt}
    if wl == "randwrite":
        rf = os.path.join(d, "rand.bin")
        size = 16 * MiB
        fd = os.open(rf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        chunk = os.urandom(MiB)
        for _ in range(16):
            os.write(fd, chunk)
        os.fsync(fd)
        os.close(fd)
        rng = random.Random(seed)
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(2000)]
        buf = os.urandom(4096)
        t = time.perf_counter()
        fd = os.open(rf, os.O_RDWR)
        for o in offs:
            os.pwrite(fd, buf, o)
        os.fsync(fd)
        os.close(fd)
        dt = time.perf_counter() - t
        return {"value": 2000 / dt, "secs": dt}
    raise SystemExit(f"unknown workload {wl}")


# ----------------------------------------------------------------------------- driver side
class Fleet:
    def __init__(self, script):
        self.script = script
        self.dir = os.environ.get("FLEET_DIR", "/tmp/fleet")

    def cmd(self, *args, check=True, capture=False, timeout=600):
        r = subprocess.run([self.script, *args], text=True, timeout=timeout,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.PIPE if capture else None)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> rc {r.returncode}\n{r.stdout or ''}{r.stderr or ''}")
        return r

    def run(self, host, argv, env=None, **kw):
        pre = ["env"] + [f"{k}={v}" for k, v in (env or {}).items()] if env else []
        return self.cmd("run", str(host), *pre, *argv, **kw)

    def sh(self, host, script, **kw):
        return self.run(host, ["sh", "-ec", script], **kw)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(fl, a):
    D = fl.dir
    efs = a.envelopefs
    key = a.key
    if not os.path.exists(key):
        os.makedirs(os.path.dirname(key), exist_ok=True)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(32))
    tr = {n: {"ENVELOPEFS_TRUST_DIR": f"{D}/h{n}/trust"} for n in (1, 2)}
    for n in (1, 2):
        os.makedirs(f"{D}/h{n}/trust", exist_ok=True)
    j1, j2 = f"{D}/h1/jfs", f"{D}/h2/jfs"
    paths = {
        "raw": f"{j1}/bench-raw",
        "single": f"{D}/h1/efs-single/bench",
        "shared": f"{D}/h1/efs-shared/bench",
        "gocrypt": f"{D}/h1/gcfs/bench",
    }
    mounts = []  # (host, mountpoint, kind), in mount order
    # raw
    fl.sh(1, f"rm -rf {j1}/bench-raw; mkdir -p {j1}/bench-raw")
    # single-host envelopefs volume
    fl.sh(1, f"rm -rf {j1}/bench-single-vol; mkdir {j1}/bench-single-vol; mkdir -p {D}/h1/efs-single")
    fl.run(1, [efs, "init", "--key-file", key, f"{j1}/bench-single-vol"], env=tr[1], capture=True)
    fl.run(1, [efs, "mount", "--key-file", key, "--allow-other", "--trust-backing-permissions",
               "--log-file", f"{D}/h1/efs-single.log", f"{j1}/bench-single-vol", f"{D}/h1/efs-single"], env=tr[1])
    mounts.append((1, f"{D}/h1/efs-single", "efs"))
    # shared envelopefs volume, mounted on both hosts
    fl.sh(1, f"rm -rf {j1}/bench-shared-vol; mkdir {j1}/bench-shared-vol; mkdir -p {D}/h1/efs-shared {D}/h2/efs-shared")
    fl.run(1, [efs, "init", "--shared", "--key-file", key, f"{j1}/bench-shared-vol"], env=tr[1], capture=True)
    fl.run(2, [efs, "trust", "--yes", "--key-file", key, f"{j2}/bench-shared-vol"], env=tr[2], capture=True)
    for n in (1, 2):
        fl.run(n, [efs, "mount", "--key-file", key, "--allow-other", "--trust-backing-permissions",
                   "--log-file", f"{D}/h{n}/efs-shared.log", f"{D}/h{n}/jfs/bench-shared-vol", f"{D}/h{n}/efs-shared"],
               env=tr[n])
        mounts.append((n, f"{D}/h{n}/efs-shared", "efs"))
    # gocryptfs -sharedstorage (host 1)
    pw = os.path.join(WORK, "gocryptfs.pw")
    with open(pw, "w") as f:
        f.write("bench-passphrase-not-secret\n")
    os.chmod(pw, 0o600)
    fl.sh(1, f"rm -rf {j1}/bench-gocrypt-cipher; mkdir {j1}/bench-gocrypt-cipher; mkdir -p {D}/h1/gcfs")
    fl.run(1, ["gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", pw, f"{j1}/bench-gocrypt-cipher"], capture=True)
    fl.run(1, ["gocryptfs", "-q", "-sharedstorage", "-passfile", pw, f"{j1}/bench-gocrypt-cipher", f"{D}/h1/gcfs"])
    mounts.append((1, f"{D}/h1/gcfs", "gocrypt"))
    for s in SYSTEMS:
        fl.sh(1, f"mkdir -p {paths[s]}")
    # show what each path is
    r = fl.sh(1, "awk '$5 ~ \"^" + D + "/h1/\" {split($0,a,\" - \"); split(a[2],b,\" \"); print $5, b[1]}' /proc/self/mountinfo",
              capture=True)
    log("host 1 mounts:\n" + r.stdout.rstrip())
    return paths, mounts


def teardown(fl, a, mounts):
    for host, mp, kind in reversed(mounts):
        if kind == "efs":
            r = fl.run(host, [a.envelopefs, "umount", mp], check=False, capture=True)
        else:
            r = fl.run(host, ["fusermount3", "-u", mp], check=False, capture=True)
        log(f"umount host {host} {mp}: rc {r.returncode} {(r.stdout + r.stderr).strip()}")


def fmt(v):
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _, _, d, wl, seed = sys.argv
        out = worker(d, wl, int(seed))
        out["sync_errors"] = SYNC_ERRORS
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fleet", default=os.path.join(REPO, "scripts/fleet-juicefs.sh"))
    p.add_argument("--envelopefs", default=os.path.join(REPO, "target/release/envelopefs"))
    p.add_argument("--key", default=os.path.join(WORK, "volume.key"))
    p.add_argument("--json", default=os.path.join(REPO, "bench/results/fleet.json"))
    p.add_argument("--fleet-up", action="store_true")
    p.add_argument("--fleet-down", action="store_true")
    a = p.parse_args()
    fl = Fleet(a.fleet)
    mounts = []
    res = {s: {w: [] for w in WORKLOADS} for s in SYSTEMS}
    errs = {s: [] for s in SYSTEMS}
    try:
        if a.fleet_up:
            fl.cmd("up")
        paths, mounts = setup(fl, a)
        for rnd in range(a.rounds):
            for s in SYSTEMS:
                for w in WORKLOADS:
                    r = fl.run(1, ["python3", HERE, "_worker", paths[s], w, str(1000 + rnd)],
                               capture=True, timeout=900)
                    v = json.loads(r.stdout.strip().splitlines()[-1])
                    res[s][w].append(v["value"])
                    errs[s].extend(f"round {rnd + 1} {w}: {e}" for e in v["sync_errors"])
                    log(f"round {rnd + 1} {s:8s} {w:10s} {fmt(v['value']):>9s} {UNIT[w]} ({v['secs']:.2f} s)"
                        + (f"  sync errors: {v['sync_errors']}" if v["sync_errors"] else ""))
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "samples": res, "sync_errors": errs, "units": UNIT, "labels": LABEL}, f,
                      indent=1)
        # ---- report
        med = {s: {w: statistics.median(res[s][w]) for w in WORKLOADS} for s in SYSTEMS}
        print(f"\nMedians of {a.rounds} interleaved rounds (host 1; samples in {a.json})\n")
        print("| system | " + " | ".join(f"{w} ({UNIT[w]})" for w in WORKLOADS) + " |")
        print("|---|" + "---:|" * len(WORKLOADS))
        for s in SYSTEMS:
            print(f"| {LABEL[s]} | " + " | ".join(fmt(med[s][w]) for w in WORKLOADS) + " |")
        print("\nAll samples (round 1, 2, ...)\n")
        print("| system | " + " | ".join(WORKLOADS) + " |")
        print("|---|" + "---|" * len(WORKLOADS))
        for s in SYSTEMS:
            print(f"| {LABEL[s]} | " + " | ".join(" / ".join(fmt(x) for x in res[s][w]) for w in WORKLOADS) + " |")
        for base in ("raw", "gocrypt"):
            print(f"\nRatio of medians vs {LABEL[base]} (>1 = faster)\n")
            print("| system | " + " | ".join(WORKLOADS) + " |")
            print("|---|" + "---:|" * len(WORKLOADS))
            for s in SYSTEMS:
                if s == base:
                    continue
                print(f"| {LABEL[s]} | " + " | ".join(f"{med[s][w] / med[base][w]:.2f}" for w in WORKLOADS) + " |")
        print("\nsyncfs() errors seen by the workloads (the timed value is kept):\n")
        for s in SYSTEMS:
            print(f"- {LABEL[s]}: {len(errs[s])}" + (f" ({'; '.join(sorted(set(e.split(': ', 1)[1] for e in errs[s])))})"
                                                    if errs[s] else ""))
    finally:
        try:
            teardown(fl, a, mounts)
        finally:
            if a.fleet_down:
                fl.cmd("down", check=False)


if __name__ == "__main__":
    main()
