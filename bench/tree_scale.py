#!/usr/bin/env python3
"""A generated tree of N files (default 1,000,000) through one envelopefs mount: untar,
`ls -lR`, read-all with every file's content checked, `rm -rf`. Reports each step's time
and the daemon's peak RSS and descriptor count, sampled throughout.

    python3 bench/tree_scale.py --files 1000000 [--mount-flags "--file-handles never"]

The tarball is written once (streamed, no tree on disk) and kept in --dir.
"""

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

PER_DIR = 1000


def content(i):
    """File i's bytes: 0 to 4 KiB, derived from i alone."""
    n = (i * 2654435761) % 4097
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (n // 32 + 1))[:n]


def path_of(i):
    return f"tree/d{i // (PER_DIR * 100):03}/d{(i // PER_DIR) % 100:02}/f{i % PER_DIR:04}"


def make_tar(path, files):
    with tarfile.open(path, "w") as t:
        dirs = set()
        for i in range(files):
            p = path_of(i)
            parent = p.rsplit("/", 1)[0]
            if parent not in dirs:
                parts = parent.split("/")
                for k in range(1, len(parts) + 1):
                    d = "/".join(parts[:k])
                    if d not in dirs:
                        info = tarfile.TarInfo(d)
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        t.addfile(info)
                        dirs.add(d)
            data = content(i)
            info = tarfile.TarInfo(p)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))


class Sampler:
    """The daemon's peak RSS (VmHWM) and peak descriptor count."""

    def __init__(self, pid):
        self.pid, self.peak_fds, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                pass
            time.sleep(0.05)

    def hwm_mib(self):
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/var/tmp/envelopefs-tree-scale")
    ap.add_argument("--binary", default=str(run.REPO / "target/release/envelopefs"))
    ap.add_argument("--mount-flags", default="")
    cfg = ap.parse_args()
    work = Path(cfg.dir)
    tar = run.work_tarball(work, cfg.files, make_tar)
    vol = work / "vol"
    shutil.rmtree(vol, ignore_errors=True)
    (vol / "backing").mkdir(parents=True)
    (vol / "mnt").mkdir()
    key = vol / "key"
    key.write_bytes(os.urandom(32))
    run.sh(cfg.binary, "init", "--key-file", key, vol / "backing")
    run.sh(cfg.binary, "mount", "--key-file", key, "--log-file", vol / "log", *cfg.mount_flags.split(),
           vol / "backing", vol / "mnt")
    mnt = vol / "mnt"
    pid = int(subprocess.run(["pgrep", "-f", f"envelopefs mount .*{vol / 'backing'}"], capture_output=True,
                             text=True).stdout.split()[0])
    s = Sampler(pid)
    times = {}
    try:
        t = time.perf_counter()
        subprocess.run(["tar", "xf", tar, "-C", mnt], check=True)
        times["untar"] = time.perf_counter() - t
        print(f"untar     {times['untar']:8.0f} s", flush=True)
        run.drop_caches()
        t = time.perf_counter()
        out = subprocess.run(["ls", "-lR", mnt / "tree"], check=True, capture_output=True, text=True).stdout
        times["ls-lR"] = time.perf_counter() - t
        listed = sum(1 for line in out.splitlines() if line.startswith("-"))
        print(f"ls -lR    {times['ls-lR']:8.0f} s, {listed} files listed", flush=True)
        assert listed == cfg.files, f"ls -lR listed {listed} files, not {cfg.files}"
        run.drop_caches()
        t = time.perf_counter()
        bad = 0
        for i in range(cfg.files):
            if (mnt / path_of(i)).read_bytes() != content(i):
                bad += 1
        times["read-all"] = time.perf_counter() - t
        print(f"read-all  {times['read-all']:8.0f} s, {bad} files differ", flush=True)
        assert bad == 0
        t = time.perf_counter()
        subprocess.run(["rm", "-rf", mnt / "tree"], check=True)
        times["rm-rf"] = time.perf_counter() - t
        print(f"rm -rf    {times['rm-rf']:8.0f} s", flush=True)
        assert not any(mnt.iterdir())
    finally:
        s.stop = True
        hwm = s.hwm_mib()
        run.sh(cfg.binary, "umount", mnt, check=False)
    warnings = sum(1 for line in open(vol / "log") if " WARN " in line or " ERROR " in line)
    print(f"\n{cfg.files} files, flags '{cfg.mount_flags}': " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; daemon peak RSS {hwm:.0f} MiB, peak descriptors {s.peak_fds}; {warnings} warnings logged")


if __name__ == "__main__":
    main()
