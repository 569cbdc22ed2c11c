#!/usr/bin/env python3
"""FUSE requests by opcode for each step of the tree workload (untar, ls -lR, read-all,
rm -rf), for envelopefs and for gocryptfs, on the same tree.

envelopefs counts the requests it serves (`envelopefs status --json`, key "requests");
gocryptfs is run with -fusedebug and its "rx N: OPCODE" lines are counted. Counts, not
times: they do not depend on how busy the machine is. Caches are dropped before each
step, as in run.py.

    python3 bench/requests.py --files 20000
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the workloads' tarball and helpers)

STEPS = [
    ("untar", lambda tree, tar: ["tar", "xf", str(tar), "-C", str(tree)]),
    ("ls-lR", lambda tree, tar: ["ls", "-lR", str(tree)]),
    ("read-all", lambda tree, tar: ["sh", "-c", f"find '{tree}' -type f -exec cat {{}} + > /dev/null"]),
    ("rm-rf", lambda tree, tar: ["rm", "-rf", str(tree)]),
]


class EnvelopefsCounts:
    def __init__(self, work, binary, extra):
        self.binary, self.extra = binary, extra
        self.root = work / "envelopefs"
        self.name = "envelopefs" + ("" if not extra else " " + " ".join(extra))

    def mount(self):
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "backing").mkdir(parents=True)
        (self.root / "mnt").mkdir()
        key = self.root / "key"
        key.write_bytes(os.urandom(32))
        run.sh(self.binary, "init", "--key-file", key, self.root / "backing")
        run.sh(self.binary, "mount", "--key-file", key, *self.extra, self.root / "backing", self.root / "mnt")
        return self.root / "mnt"

    def counts(self):
        out = subprocess.run([self.binary, "status", "--json", self.root / "mnt"], capture_output=True, check=True)
        st = json.loads(out.stdout)
        return collections.Counter({k.upper(): v for k, v in st["requests"].items()}), st

    def unmount(self):
        run.sh(self.binary, "umount", self.root / "mnt", check=False)


class GocryptfsCounts:
    name = "gocryptfs"

    def __init__(self, work):
        self.root = work / "gocryptfs"

    def mount(self):
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "backing").mkdir(parents=True)
        (self.root / "mnt").mkdir()
        pw = self.root / "pw"
        pw.write_text("benchmark passphrase")
        run.sh("gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", pw, self.root / "backing")
        self.log = open(self.root / "fusedebug.log", "w")
        self.proc = subprocess.Popen(["gocryptfs", "-fg", "-fusedebug", "-passfile", pw, self.root / "backing",
                                      self.root / "mnt"], stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            if run.is_mounted(self.root / "mnt"):
                break
            time.sleep(0.05)
        return self.root / "mnt"

    def counts(self):
        self.log.flush()
        time.sleep(0.5)  # let the log catch up
        c = collections.Counter()
        for m in re.finditer(r" rx \d+: (\w+) ", (self.root / "fusedebug.log").read_text(errors="replace")):
            c[m.group(1)] += 1
        return c, {}

    def unmount(self):
        run.sh("umount", self.root / "mnt", check=False)
        self.proc.wait(timeout=20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--dir", default="/var/tmp/envelopefs-requests")
    ap.add_argument("--binary", default=str(run.REPO / "target/release/envelopefs"))
    ap.add_argument("--envelopefs-flags", default="", help="extra mount flags for envelopefs")
    ap.add_argument("--no-gocryptfs", action="store_true")
    cfg = ap.parse_args()
    work = Path(cfg.dir)
    tar = run.work_tarball(work, cfg.files)
    systems = [EnvelopefsCounts(work, cfg.binary, cfg.envelopefs_flags.split())]
    if not cfg.no_gocryptfs:
        systems.append(GocryptfsCounts(work))
    table = {}
    for s in systems:
        mnt = s.mount()
        try:
            tree = mnt / "tree"
            tree.mkdir()
            before, _ = s.counts()
            for step, cmd in STEPS:
                run.drop_caches()
                subprocess.run(cmd(tree, tar), check=True, stdout=subprocess.DEVNULL)
                after, st = s.counts()
                table[(s.name, step)] = after - before
                extra = f" (inodes known {st['inodes_known']}, descriptors {st['inode_fds']})" if st else ""
                print(f"{s.name:28} {step:9} {sum((after - before).values()):8} requests{extra}", flush=True)
                before = after
        finally:
            s.unmount()
    print(f"\nFUSE requests by opcode, {cfg.files}-file tree (`python3 bench/requests.py {' '.join(sys.argv[1:])}`)\n")
    for step, _ in STEPS:
        ops = sorted({op for (n, st), c in table.items() if st == step for op in c},
                     key=lambda op: -max(table[(s.name, step)][op] for s in systems))
        print(f"| {step} | " + " | ".join(s.name for s in systems) + " |")
        print("|---|" + "---:|" * len(systems))
        for op in ops:
            print(f"| {op} | " + " | ".join(str(table[(s.name, step)][op]) for s in systems) + " |")
        print(f"| **total** | " + " | ".join(str(sum(table[(s.name, step)].values())) for s in systems) + " |\n")


if __name__ == "__main__":
    main()
