#!/usr/bin/env python3
"""Throughput of envelopefs beside its peers, measured side by side on one disk.

Mounts fresh volumes of: the bare directory, a FUSE passthrough without crypto (bindfs),
gocryptfs, and envelopefs, then runs every workload interleaved
across systems (A B C A B C ...) for several rounds so machine drift cancels out, and
reports medians and ratios. Run as root:

    python3 bench/run.py                 # defaults: 3 rounds, 5 systems, under 10 minutes on 2 cores
    python3 bench/run.py --quick         # 1 round, smaller sizes: a smoke test
    python3 bench/run.py --systems envelopefs,envelopefs-kms,envelopefs-kms-10ms --workloads smallfiles
                                         # the aws-kms provider vs local (needs moto: pip install moto flask flask-cors)
    python3 bench/run.py --systems envelopefs-kms-10ms,envelopefs-kms-2slots-10ms,envelopefs-kms-ik-10ms,envelopefs-kms-ik-2slots-10ms --workloads smallfiles
                                         # one KMS key slot vs two, per-file and intermediate-key mode
    python3 bench/run.py --systems gocryptfs,envelopefs,envelopefs-plaintext-names --workloads tree
    python3 bench/run.py --systems envelopefs,envelopefs-uring --workloads tree,opens,rand
                                         # FUSE over /dev/fuse vs over io_uring (--io-uring; sets enable_uring=Y)
                                         # hidden names (the default) vs gocryptfs and vs plaintext names

Writes results/<stamp>/{results.json,results.csv,table.md,chart.svg} under bench/.
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, text=True, capture_output=True, **kw)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def need(tool, package):
    if shutil.which(tool) is None:
        print(f"installing {package} (for {tool})", file=sys.stderr)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True, text=True)
        if r.returncode != 0 or shutil.which(tool) is None:
            sys.exit(f"missing {tool}: install the Debian package {package}")


def is_mounted(path):
    want = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == want for line in f)


class System:
    """A place to run workloads: `path` is where files go."""

    fuse = True

    def __init__(self, name, work):
        self.name = name
        self.root = Path(work) / name
        self.backing = self.root / "backing"
        self.path = self.root / "mnt"

    def create(self):
        shutil.rmtree(self.root, ignore_errors=True)
        self.backing.mkdir(parents=True)
        self.path.mkdir()

    def mount(self):
        pass

    def unmount(self):
        if is_mounted(self.path):
            sh("umount", self.path, check=False)
            for _ in range(200):
                if not is_mounted(self.path):
                    break
                time.sleep(0.05)

    def remount(self):
        self.unmount()
        self.mount()

    def stats(self):
        return {}


class Bare(System):
    fuse = False

    def create(self):
        super().create()
        self.path = self.backing


class Passthrough(System):
    def mount(self):
        sh("bindfs", "--no-allow-other", self.backing, self.path)


class Gocryptfs(System):
    def create(self):
        super().create()
        self.pw = self.root / "pw"
        self.pw.write_text("benchmark passphrase")
        sh("gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", self.pw, self.backing)

    def mount(self):
        sh("gocryptfs", "-q", "-passfile", self.pw, self.backing, self.path)


class Envelopefs(System):
    def __init__(self, name, work, binary, extra, init_extra=()):
        super().__init__(name, work)
        self.binary = binary
        self.extra = extra
        self.init_args = list(init_extra)

    def create(self):
        super().create()
        self.key = self.root / "volume.key"
        self.key.write_bytes(os.urandom(32))
        sh(self.binary, "init", "--key-file", self.key, *self.init_args, self.backing)

    def mount(self):
        self.log = self.root / "envelopefs.log"
        sh(self.binary, "mount", "--key-file", self.key, "--log-file", self.log, *self.extra, self.backing, self.path)

    def unmount(self):
        if is_mounted(self.path):
            sh(self.binary, "umount", self.path, check=False)


class EnvelopefsUring(Envelopefs):
    """envelopefs serving FUSE over io_uring (--io-uring): enable_uring is set to Y while it
    is mounted and put back after; a mount that fell back to /dev/fuse stops the run."""

    PARAM = Path("/sys/module/fuse/parameters/enable_uring")

    def mount(self):
        self.before = self.PARAM.read_text().strip()
        self.PARAM.write_text("Y")
        super().mount()
        for _ in range(100):
            if "over io_uring" in self.log.read_text():
                return
            time.sleep(0.05)
        sys.exit(f"{self.name}: not served over io_uring:\n{self.log.read_text()}")

    def unmount(self):
        super().unmount()
        if getattr(self, "before", None):
            self.PARAM.write_text(self.before)


class EnvelopefsKms(Envelopefs):
    """envelopefs on the aws-kms provider: moto's KMS on loopback behind the fault-injection
    proxy from tests/support, which adds `latency_ms` to every KMS call and counts calls."""

    def __init__(self, name, work, binary, latency_ms, init_extra=(), slots=1, extra=()):
        super().__init__(name, work, binary, list(extra))
        self.latency_ms = latency_ms
        self.init_extra = list(init_extra)
        self.slots = slots
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                        AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")

    def create(self):
        System.create(self)
        if shutil.which("moto_server") is None:
            sys.exit("missing moto_server: pip install moto flask flask-cors")
        # One KMS server (and latency proxy) per key slot, as two regions are two services:
        # moto is single-threaded, and one moto serving both slots would halve the rate by
        # its own CPU, not by anything envelopefs does.
        self.servers = [self.start_server() for _ in range(self.slots)]
        arns = []
        for url, _, _, _ in self.servers:
            code = (f"import boto3; c = boto3.client('kms', endpoint_url='{url}'); "
                    "print(c.create_key()['KeyMetadata']['Arn'])")
            arns.append(subprocess.run(["python3", "-c", code], env=self.env, check=True, capture_output=True,
                                       text=True).stdout.strip())
        self.proxy_url = self.servers[0][1]
        subprocess.run([self.binary, "init", "--provider", "aws-kms", "--key-id", arns[0], "--kms-endpoint", self.proxy_url,
                        *self.init_extra, self.backing], env=self.env, check=True, capture_output=True)
        # Further key slots (docs/FORMAT.md §9), each behind its own proxy with the same latency.
        for arn, (_, proxy_url, _, _) in zip(arns[1:], self.servers[1:]):
            subprocess.run([self.binary, "key", "slot", "add", "--aws-kms", arn, "--kms-endpoint", proxy_url,
                            *self.init_extra, self.backing], env=self.env, check=True, capture_output=True)

    def start_server(self):
        port = free_port()
        moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                import socket
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        proxy = subprocess.Popen(["python3", str(REPO / "tests/support/kms_proxy.py"), "--upstream", url,
                                  "--latency-ms", str(self.latency_ms)], stdout=subprocess.PIPE, text=True)
        return url, f"http://127.0.0.1:{proxy.stdout.readline().strip()}", moto, proxy

    def mount(self):
        self.log = self.root / "envelopefs.log"
        subprocess.run([self.binary, "mount", "--log-file", self.log, *self.extra, self.backing, self.path],
                       env=self.env, check=True, capture_output=True)

    def cpu(self):
        """CPU seconds so far of (the mount's daemon, the KMS servers and proxies): where
        a create's cost goes when the machine, not KMS latency, is the limit."""
        servers = sum(proc_cpu(p.pid) for _, _, moto, proxy in self.servers for p in (moto, proxy))
        daemon = sum(proc_cpu(pid) for pid in pids_of(self.binary, str(self.path)))
        return daemon, servers

    def calls(self):
        """KMS calls by operation, summed over every slot's server."""
        import urllib.request
        total = {}
        for _, proxy_url, _, _ in self.servers:
            with urllib.request.urlopen(proxy_url + "/__proxy") as r:
                for op, n in json.load(r)["calls"].items():
                    total[op] = total.get(op, 0) + n
        return total

    def unmount(self):
        super().unmount()

    def stop(self):
        for p in [p for _, _, moto, proxy in getattr(self, "servers", []) for p in (proxy, moto)]:
            if p:
                p.kill()


def proc_cpu(pid):
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_of(binary, arg):
    """Processes running `binary` with `arg` on their command line."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(Path(binary).name.encode()) and arg.encode() in argv:
                out.append(int(d.name))
    return out


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- workloads


def fio(system, name, rw, bs, size, runtime=None):
    args = ["fio", f"--name={name}", f"--filename={system.path / name}", f"--rw={rw}", f"--bs={bs}",
            f"--size={size}", "--ioengine=psync", "--output-format=json", "--end_fsync=1", "--invalidate=1"]
    if runtime:
        args += [f"--runtime={runtime}", "--time_based"]
    out = json.loads(sh(*args).stdout)
    job = out["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side


def w_seq(s, cfg):
    """Write a large file in 1 MiB I/O (fsync at the end), then read it back cold."""
    (s.path / "seq").unlink(missing_ok=True)
    w = fio(s, "seq", "write", "1M", f"{cfg.seq_mib}M")["bw_bytes"] / 1e6
    drop_caches()
    r = fio(s, "seq", "read", "1M", f"{cfg.seq_mib}M")["bw_bytes"] / 1e6
    (s.path / "seq").unlink()
    return {"seq-write": w, "seq-read": r}


def w_rand(s, cfg):
    """4 KiB random writes then cold random reads over a file laid out beforehand."""
    p = s.path / "rand"
    if not p.exists() or p.stat().st_size != cfg.rand_mib << 20:
        fio(s, "rand", "write", "1M", f"{cfg.rand_mib}M")
    w = fio(s, "rand", "randwrite", "4k", f"{cfg.rand_mib}M", cfg.rand_secs)
    drop_caches()
    r = fio(s, "rand", "randread", "4k", f"{cfg.rand_mib}M", cfg.rand_secs)
    return {"rand-write-4k": w["iops"], "rand-read-4k": r["iops"]}


def w_syncwrites(s, cfg):
    """Four writers of 4 KiB random writes, each followed by fsync, to files of their own
    (a database's commits): what the crash journal's sync mode costs, and what writers that
    flush at the same time share."""
    args = ["fio", "--name=syncw", f"--directory={s.path}", "--rw=randwrite", "--bs=4k", "--size=8m",
            "--numjobs=4", "--fsync=1", "--ioengine=psync", "--time_based", f"--runtime={cfg.rand_secs}",
            "--group_reporting", "--output-format=json"]
    out = json.loads(sh(*args).stdout)
    for f in s.path.glob("syncw.*"):
        f.unlink()
    return {"sync-writes-4x4k": out["jobs"][0]["write"]["iops"]}


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def w_tree(s, cfg):
    """Extract a source-like tree, list it, read it all (cold), delete it."""
    tree = s.path / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    out = {"untar": timed(lambda: sh("tar", "xf", cfg.tarball, "-C", tree))}
    drop_caches()
    out["ls-lR"] = timed(lambda: sh("ls", "-lR", tree))
    drop_caches()
    out["read-all"] = timed(lambda: sh("sh", "-c", f"find '{tree}' -type f -exec cat {{}} + > /dev/null"))
    out["rm-rf"] = timed(lambda: shutil.rmtree(tree))
    return out


def w_opens(s, cfg):
    """open + read 1 byte + close of existing 4 KiB files: right after a remount (cold
    caches, empty DEK cache), then again (warm)."""
    d = s.path / "opens"
    if not d.exists():
        d.mkdir()
        for i in range(cfg.open_files):
            (d / f"f{i}").write_bytes(b"x" * 4096)
    names = [str(d / f"f{i}") for i in range(cfg.open_files)]

    def once():
        t = time.perf_counter()
        for n in names:
            fd = os.open(n, os.O_RDONLY)
            os.read(fd, 1)
            os.close(fd)
        return len(names) / (time.perf_counter() - t)

    s.remount()
    drop_caches()
    cold = once()
    once()
    return {"open-cold": cold, "open-warm": once()}


def w_smallfiles(s, cfg):
    """Create many 1 KiB files (each needs a new wrapped DEK), then open them all after a
    remount (each needs an unwrap). KMS systems also report KMS calls per operation."""
    d = s.path / "small"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    n = cfg.small_files
    calls0 = s.calls() if hasattr(s, "calls") else None
    cpu0 = s.cpu() if hasattr(s, "cpu") else None
    t = time.perf_counter()
    for i in range(n):
        with open(d / f"f{i}", "wb") as f:
            f.write(b"x" * 1024)
    creates = n / (time.perf_counter() - t)
    cpu1 = s.cpu() if cpu0 else None
    s.remount()
    calls1 = s.calls() if hasattr(s, "calls") else None
    t = time.perf_counter()
    for i in range(n):
        with open(d / f"f{i}", "rb") as f:
            f.read(1)
    opens = n / (time.perf_counter() - t)
    out = {"create-1k": creates, "open-after-remount": opens}
    if calls0 is not None:
        calls2 = s.calls()
        # Several slots wrap a locally drawn DEK with Encrypt instead of GenerateDataKey.
        gen = sum(calls1.get(op, 0) - calls0.get(op, 0) for op in ("GenerateDataKey", "Encrypt"))
        dec = calls2.get("Decrypt", 0) - calls1.get("Decrypt", 0)
        out["kms-calls-per-create"] = gen / n
        out["kms-calls-per-open"] = dec / n
    if cpu0:
        out["daemon-cpu-per-create"] = (cpu1[0] - cpu0[0]) * 1000 / n
        out["kms-server-cpu-per-create"] = (cpu1[1] - cpu0[1]) * 1000 / n
    shutil.rmtree(d)
    return out


def w_treeread(s, cfg):
    """grep -r over 20 directories of 100 files of 1 KiB, cold after a remount: one open
    after another, as a backup or a build reads a tree. KMS systems also report Decrypts per
    file read (what unwrapping ahead costs beyond one per file)."""
    d = s.path / "treeread"
    n = 20 * 100
    if not d.exists():
        for i in range(20):
            (d / f"d{i}").mkdir(parents=True)
            for j in range(100):
                (d / f"d{i}" / f"f{j}").write_bytes(b"y" * 1024)
    s.remount()
    drop_caches()
    calls0 = s.calls() if hasattr(s, "calls") else None
    cpu0 = s.cpu() if hasattr(s, "cpu") else None
    t = time.perf_counter()
    # grep exits 1 when nothing matches, which is what it reads here.
    subprocess.run(["grep", "-r", "-c", "needle", str(d)], stdout=subprocess.DEVNULL, check=False)
    out = {"treeread-files": n / (time.perf_counter() - t)}
    if calls0 is not None:
        out["kms-decrypts-per-file"] = (s.calls().get("Decrypt", 0) - calls0.get("Decrypt", 0)) / n
    if cpu0:
        cpu1 = s.cpu()
        out["daemon-cpu-per-file"] = (cpu1[0] - cpu0[0]) * 1000 / n
        out["kms-server-cpu-per-file"] = (cpu1[1] - cpu0[1]) * 1000 / n
    return out


# metric, unit, higher is better
METRICS = [
    ("seq-write", "MB/s", True),
    ("seq-read", "MB/s", True),
    ("rand-write-4k", "IOPS", True),
    ("rand-read-4k", "IOPS", True),
    ("untar", "s", False),
    ("ls-lR", "s", False),
    ("read-all", "s", False),
    ("rm-rf", "s", False),
    ("open-cold", "opens/s", True),
    ("open-warm", "opens/s", True),
    ("create-1k", "files/s", True),
    ("open-after-remount", "opens/s", True),
    ("kms-calls-per-create", "calls", False),
    ("kms-calls-per-open", "calls", False),
    ("daemon-cpu-per-create", "ms", False),
    ("kms-server-cpu-per-create", "ms", False),
    ("appends-1000B", "appends/s", True),
    ("treeread-files", "files/s", True),
    ("sync-writes-4x4k", "IOPS", True),
    ("kms-decrypts-per-file", "calls", False),
    ("daemon-cpu-per-file", "ms", False),
    ("kms-server-cpu-per-file", "ms", False),
]
def w_appends(s, cfg):
    """A log writer: appends of 1000 bytes (never block-aligned, so each rewrites the partial
    last block in place), fsync every 100 appends. Reports appends per second."""
    p = s.path / "log"
    p.unlink(missing_ok=True)
    n = cfg.appends
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rec = os.urandom(1000)
    t = time.perf_counter()
    for i in range(n):
        os.write(fd, rec)
        if i % 100 == 99:
            os.fsync(fd)
    os.fsync(fd)
    rate = n / (time.perf_counter() - t)
    os.close(fd)
    p.unlink()
    return {"appends-1000B": rate}


WORKLOADS = {"syncwrites": w_syncwrites, "treeread": w_treeread, "seq": w_seq, "rand": w_rand, "tree": w_tree, "opens": w_opens, "smallfiles": w_smallfiles,
             "appends": w_appends}


def work_tarball(work, files, make=None):
    """The N-file tarball kept in `work` (made there with `make`, default make_tarball)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    tar = work / f"tree-{files}.tar"
    if not tar.exists():
        t = time.perf_counter()
        (make or make_tarball)(tar, files)
        print(f"tarball of {files} files written in {time.perf_counter() - t:.0f} s", flush=True)
    return tar


def make_tarball(path, files, seed=1):
    """A source-like tree: many small files, a few large, a few directory levels."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for i in range(files):
            d = src / f"mod{i // 200}" / f"sub{(i // 20) % 10}"
            d.mkdir(parents=True, exist_ok=True)
            size = min(int(rnd.expovariate(1 / 4000)) + 16, 1 << 20)
            (d / f"file{i}.rs").write_bytes(rnd.randbytes(size // 2).hex().encode()[:size])
        with tarfile.open(path, "w") as t:
            t.add(src, arcname="src")


def machine_info(binary):
    def first(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "envelopefs": first([binary, "--version"]),
        "gocryptfs": first(["gocryptfs", "--version"]),
        "bindfs": first(["bindfs", "--version"]),
        "fio": first(["fio", "--version"]),
    }


def chart(results, systems, path):
    """One panel per workload: each system's speed relative to gocryptfs on a log axis
    (gocryptfs = 1, right is faster), with the bare disk as a dashed reference line. Written
    as PNG and SVG. Installs matplotlib with pip if it is missing (like fio and gocryptfs);
    skipped, said, if that fails."""
    try:
        import matplotlib
    except ImportError:
        print("installing matplotlib (for the chart)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], capture_output=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib missing and pip could not install it: no chart")
        return
    base = "gocryptfs" if "gocryptfs" in systems else systems[0]
    ws = [w for w in METRICS if (w[0], base) in results and any((w[0], s) in results for s in systems)]
    shown = [s for s in systems if s != "bare"]
    colors = {"gocryptfs": "#e07b39", "passthrough": "#999999"}
    palette = ["#2b7bba", "#69a84f", "#9b59b6", "#c0392b", "#17becf", "#8c564b"]
    for s in shown:
        colors.setdefault(s, palette[len([c for c in colors if c.startswith("envelopefs")]) % len(palette)])
    cols = 4
    rows = (len(ws) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 0.45 * len(shown) * rows + 1.2 * rows), squeeze=False)

    def rel(name, higher, s):
        v, b = results[(name, s)], results[(name, base)]
        return v / b if higher else b / v

    for ax, (name, unit, higher) in zip(axes.flat, ws):
        here = [s for s in shown if (name, s) in results]
        vals = [rel(name, higher, s) for s in here]
        # Bars grow from 1 (gocryptfs): right of it faster, left of it slower.
        ax.barh(range(len(here)), [v - 1 for v in vals], left=1, color=[colors[s] for s in here])
        ax.set_xscale("log")
        ax.axvline(1, color=colors.get(base, "black"), linewidth=1)
        lo, hi = min(vals + [1]), max(vals + [1])
        if (name, "bare") in results:
            b = rel(name, higher, "bare")
            ax.axvline(b, color="black", linestyle="--", linewidth=1)
            ax.text(b, len(here) - 0.4, " bare disk", fontsize=7, va="bottom")
            lo, hi = min(lo, b), max(hi, b)
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 1.6 <= t <= hi * 1.6]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for k, v in enumerate(vals):
            ax.text(v, k, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_yticks(range(len(here)))
        ax.set_yticklabels(here, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{name} ({unit}, {'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(ws):]:
        ax.axis("off")
    fig.suptitle(f"Speed relative to {base} (log axis, right is faster; dashed: the bare disk)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def chart_from(results_json):
    """Redraw the chart of an earlier run from its results.json."""
    data = json.loads(Path(results_json).read_text())
    medians = {(r["workload"], r["system"]): r["median"] for r in data["results"]}
    systems = list(dict.fromkeys(r["system"] for r in data["results"]))
    chart(medians, systems, Path(results_json).parent / "chart")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-mib", type=int, default=512, help="sequential file size")
    ap.add_argument("--rand-mib", type=int, default=128, help="random I/O file size")
    ap.add_argument("--rand-secs", type=int, default=4, help="seconds per random I/O run")
    ap.add_argument("--files", type=int, default=5000, help="files in the small-file tree")
    ap.add_argument("--open-files", type=int, default=2000)
    ap.add_argument("--small-files", type=int, default=2000, help="files in the smallfiles workload")
    ap.add_argument("--appends", type=int, default=20000, help="1000-byte appends in the appends workload")
    ap.add_argument("--systems", default="bare,passthrough,gocryptfs,envelopefs")
    ap.add_argument("--workloads", default="seq,rand,tree,opens", help="of: " + ", ".join(WORKLOADS))
    ap.add_argument("--dir", default="/var/tmp/envelopefs-bench", help="work directory (same disk for all)")
    ap.add_argument("--binary", default=str(REPO / "target/release/envelopefs"))
    ap.add_argument("--quick", action="store_true", help="1 round, small sizes")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--baseline-binary", help="another envelopefs build, as the system envelopefs-baseline")
    ap.add_argument("--chart-from", metavar="RESULTS_JSON", help="only redraw the chart of an earlier run")
    cfg = ap.parse_args()
    if cfg.chart_from:
        return chart_from(cfg.chart_from)
    if cfg.quick:
        cfg.rounds, cfg.seq_mib, cfg.rand_mib, cfg.rand_secs, cfg.files, cfg.open_files = 1, 256, 64, 2, 2000, 500
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, drop_caches)")
    for tool, pkg in [("fio", "fio"), ("bindfs", "bindfs"), ("gocryptfs", "gocryptfs"), ("tar", "tar")]:
        need(tool, pkg)
    if not Path(cfg.binary).exists() or "--binary" not in sys.argv:
        print("building envelopefs (release)", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=REPO, check=True)

    work = Path(cfg.dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg.tarball = work / f"tree-{cfg.files}.tar"
    if not cfg.tarball.exists():
        make_tarball(cfg.tarball, cfg.files)

    makers = {
        "bare": lambda: Bare("bare", work),
        "passthrough": lambda: Passthrough("passthrough", work),
        "gocryptfs": lambda: Gocryptfs("gocryptfs", work),
        "envelopefs": lambda: Envelopefs("envelopefs", work, cfg.binary, []),
        # `init`'s default hides names (format 4); this is the same volume with them in the clear.
        "envelopefs-plaintext-names": lambda: Envelopefs("envelopefs-plaintext-names", work, cfg.binary, [],
                                                         ["--plaintext-names"]),
        "envelopefs-uring": lambda: EnvelopefsUring("envelopefs-uring", work, cfg.binary, ["--io-uring"]),
        "envelopefs-no-writeback": lambda: Envelopefs("envelopefs-no-writeback", work, cfg.binary, ["--no-writeback-cache"]),
        # The crash journal (docs/FORMAT.md §8): ordered is the default; off is the earlier behaviour.
        "envelopefs-baseline": lambda: Envelopefs("envelopefs-baseline", work, cfg.baseline_binary, []),
        "envelopefs-ra128": lambda: Envelopefs("envelopefs-ra128", work, cfg.binary, ["--read-ahead-kb", "0"]),
        "envelopefs-exclusive": lambda: Envelopefs("envelopefs-exclusive", work, cfg.binary, ["--exclusive"]),
        "envelopefs-journal-off": lambda: Envelopefs("envelopefs-journal-off", work, cfg.binary, ["--journal", "off"]),
        "envelopefs-baseline-journal-sync": lambda: Envelopefs("envelopefs-baseline-journal-sync", work,
                                                               cfg.baseline_binary, ["--journal", "sync"]),
        "envelopefs-journal-sync": lambda: Envelopefs("envelopefs-journal-sync", work, cfg.binary, ["--journal", "sync"]),
        "envelopefs-kms": lambda: EnvelopefsKms("envelopefs-kms", work, cfg.binary, 0),
        "envelopefs-kms-10ms": lambda: EnvelopefsKms("envelopefs-kms-10ms", work, cfg.binary, 10),
        "envelopefs-kms-10ms-baseline": lambda: EnvelopefsKms("envelopefs-kms-10ms-baseline", work,
                                                             cfg.baseline_binary, 10),
        "envelopefs-kms-10ms-no-prefetch": lambda: EnvelopefsKms("envelopefs-kms-10ms-no-prefetch", work, cfg.binary,
                                                                10, extra=["--prefetch-keys", "0"]),
        "envelopefs-kms-ik-10ms": lambda: EnvelopefsKms("envelopefs-kms-ik-10ms", work, cfg.binary, 10,
                                                        ["--kms-intermediate-key"]),
        # Two KMS key slots (every DEK wrapped by both keys, concurrently).
        "envelopefs-kms-2slots-10ms": lambda: EnvelopefsKms("envelopefs-kms-2slots-10ms", work, cfg.binary, 10, slots=2),
        "envelopefs-kms-ik-2slots-10ms": lambda: EnvelopefsKms("envelopefs-kms-ik-2slots-10ms", work, cfg.binary, 10,
                                                               ["--kms-intermediate-key"], slots=2),
    }
    names = cfg.systems.split(",")
    systems = [makers[n]() for n in names]
    units = {m: u for m, u, _ in METRICS}
    samples = {}
    try:
        for s in systems:
            s.create()
            s.mount()
        for wname in cfg.workloads.split(","):
            fn = WORKLOADS[wname]
            for r in range(cfg.rounds):
                order = systems if r % 2 == 0 else list(reversed(systems))
                for s in order:
                    for metric, v in fn(s, cfg).items():
                        samples.setdefault((metric, s.name), []).append(v)
                        print(f"{metric:14} round {r + 1}  {s.name:22} {v:12.2f} {units[metric]}", flush=True)
    finally:
        for s in systems:
            s.unmount()
            if hasattr(s, "stop"):
                s.stop()
    chosen = [m for m in METRICS if any((m[0], n) in samples for n in names)]

    medians = {k: statistics.median(v) for k, v in samples.items()}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out) / stamp
    out.mkdir(parents=True)
    info = machine_info(cfg.binary)
    info["command"] = "python3 bench/run.py " + " ".join(sys.argv[1:])
    info["rounds"] = cfg.rounds
    rows = []
    for name, unit, higher in chosen:
        for s in names:
            if (name, s) not in medians:
                continue
            v = medians[(name, s)]

            def ratio(peer):
                p = medians.get((name, peer))
                if p is None:
                    return None
                return round(v / p if higher else p / v, 2)

            rows.append({"workload": name, "unit": unit, "higher_is_better": higher, "system": s,
                         "median": round(v, 3), "samples": [round(x, 3) for x in samples[(name, s)]],
                         "vs_gocryptfs": ratio("gocryptfs"), "vs_passthrough": ratio("passthrough"), "vs_bare": ratio("bare")})
    (out / "results.json").write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    with open(out / "results.csv", "w") as f:
        f.write("workload,unit,system,median,vs_gocryptfs,vs_passthrough,vs_bare\n")
        for r in rows:
            f.write(f"{r['workload']},{r['unit']},{r['system']},{r['median']},{r['vs_gocryptfs']},{r['vs_passthrough']},{r['vs_bare']}\n")
    peers = [p for p in ("gocryptfs", "passthrough", "bare", "envelopefs-journal-off") if p in names and "envelopefs" in names]
    md = [f"Run {info['date']} on {info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB), kernel {info['kernel']}; "
          f"{cfg.rounds} interleaved rounds, medians. `{info['command']}`", "",
          "Ratios are speed-ups (>1 = faster than the peer), for times and rates alike.", "",
          "| workload | " + " | ".join(names) + "".join(f" | envelopefs vs {p}" for p in peers) + " |",
          "|---|" + "---|" * (len(names) + len(peers))]
    for name, unit, higher in chosen:
        cells = [f"{medians[(name, s)]:.2f}" if (name, s) in medians else "—" for s in names]
        e = next((r for r in rows if r["workload"] == name and r["system"] == "envelopefs"), None)
        def vs(p):
            if not e:
                return ""
            if f"vs_{p}" in e:
                return str(e[f"vs_{p}"])
            base = medians.get((name, p))
            return str(round(e["median"] / base if higher else base / e["median"], 2)) if base else ""
        extra = [vs(p) for p in peers]
        md.append(f"| {name} ({unit}) | " + " | ".join(cells + extra) + " |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    chart(medians, names, out / "chart")
    print("\n".join(md))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
