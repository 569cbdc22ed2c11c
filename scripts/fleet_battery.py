"""What one host does in the shared-volume battery (scripts/fleet-battery.sh).

    python3 fleet_battery.py ACTION HOST MOUNT [ARGS...]

Each action works on the envelopefs mount MOUNT as host HOST (1 or 2); `check-*` actions
read back what both hosts did and exit non-zero, saying why, when it is not exactly what
the model says.
"""

import errno
import fcntl
import hashlib
import os
import sqlite3
import sys
import time

FILES = 20


def pattern(seed, n):
    out = bytearray()
    block = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d/%d" % (seed, block)).digest()
        block += 1
    return bytes(out[:n])


def fail(why):
    print("FAIL: " + why, file=sys.stderr)
    sys.exit(1)


def setup(host, mnt):
    os.mkdir(f"{mnt}/race")
    os.mkdir(f"{mnt}/block")
    for i in range(FILES):
        open(f"{mnt}/race/f{i}", "wb").close()
        with open(f"{mnt}/block/f{i}", "wb") as f:
            f.write(pattern(300 + i, 4096))
    for name in ("log", "lockme"):
        open(f"{mnt}/{name}", "wb").close()
    for name in ("shared-k", "k1", "k2"):
        with open(f"{mnt}/{name}", "wb") as f:
            f.write(pattern(400, 3 * 4096))


def header_race(host, mnt):
    # Both hosts write each empty file at once: host 1 at 0, host 2 at 10,000.
    for i in range(FILES):
        with open(f"{mnt}/race/f{i}", "r+b") as f:
            os.pwrite(f.fileno(), pattern(host * 100 + i, 3000), 0 if host == 1 else 10_000)


def check_header_race(host, mnt):
    for i in range(FILES):
        want = bytearray(13_000)
        want[:3000] = pattern(100 + i, 3000)
        want[10_000:] = pattern(200 + i, 3000)
        with open(f"{mnt}/race/f{i}", "rb") as f:
            if f.read() != want:
                fail(f"race/f{i} on host {host} is not both hosts' writes")


def disjoint(host, mnt):
    # Each host writes its own 16 bytes of block 0 of each file, with fsync.
    for i in range(FILES):
        with open(f"{mnt}/block/f{i}", "r+b") as f:
            os.pwrite(f.fileno(), (b"A" if host == 1 else b"B") * 16, 0 if host == 1 else 100)
            os.fsync(f.fileno())


def check_disjoint(host, mnt):
    for i in range(FILES):
        want = bytearray(pattern(300 + i, 4096))
        want[:16] = b"A" * 16
        want[100:116] = b"B" * 16
        with open(f"{mnt}/block/f{i}", "rb") as f:
            if f.read() != want:
                fail(f"block/f{i} on host {host} lost one host's bytes")


def appends(host, mnt, n=100):
    with open(f"{mnt}/log", "r+b") as f:
        for i in range(n):
            rec = (b"host %d record %d" % (host, i)).ljust(99, b".") + b"\n"
            fcntl.lockf(f, fcntl.LOCK_EX)
            end = os.fstat(f.fileno()).st_size
            os.pwrite(f.fileno(), rec, end)
            fcntl.lockf(f, fcntl.LOCK_UN)


def check_appends(host, mnt, n=100):
    with open(f"{mnt}/log", "rb") as f:
        recs = sorted(l.rstrip(b".") for l in f.read().splitlines())
    want = sorted(b"host %d record %d" % (h, i) for h in (1, 2) for i in range(n))
    if recs != want:
        fail(f"log on host {host}: {len(recs)} records, {len(want)} expected, or some torn")


def hold_lock(host, mnt, seconds):
    with open(f"{mnt}/lockme", "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(float(seconds))


def try_lock(host, mnt, expect):
    with open(f"{mnt}/lockme", "r+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = "granted"
        except OSError as e:
            got = errno.errorcode[e.errno]
    if got != expect:
        fail(f"lock on host {host}: {got}, expected {expect}")


def sqlite_writer(host, mnt, n=100):
    db = sqlite3.connect(f"{mnt}/db.sqlite", timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (host, i) VALUES (?, ?)", (host, i))
        db.execute("COMMIT")
    db.close()


def sqlite_init(host, mnt):
    db = sqlite3.connect(f"{mnt}/db.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (host INTEGER, i INTEGER, PRIMARY KEY (host, i))")
    db.close()


def check_sqlite(host, mnt, n=100):
    db = sqlite3.connect(f"{mnt}/db.sqlite")
    ok = db.execute("PRAGMA integrity_check").fetchone()[0]
    rows = sorted(db.execute("SELECT host, i FROM t").fetchall())
    if ok != "ok":
        fail(f"sqlite integrity_check on host {host}: {ok}")
    if rows != sorted((h, i) for h in (1, 2) for i in range(n)):
        fail(f"sqlite on host {host}: {len(rows)} rows, {2 * n} committed")


def sqlite_report(host, mnt, n=100):
    db = sqlite3.connect(f"{mnt}/db.sqlite")
    ok = db.execute("PRAGMA integrity_check").fetchone()[0]
    rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
    print(f"integrity_check {ok}, {rows} of {2 * n} committed rows")


def overwrite(host, mnt, name, marker):
    with open(f"{mnt}/{name}", "r+b") as f:
        os.pwrite(f.fileno(), marker.encode() * (4096 // len(marker)), 0)
        os.fsync(f.fileno())


def overwrite_loop(host, mnt, name, marker):
    # Until killed (its daemon is): each write a whole block, fsynced.
    while True:
        try:
            overwrite(host, mnt, name, marker)
        except OSError:
            return


def check_block(host, mnt, name, marker):
    want = marker.encode() * (4096 // len(marker))
    with open(f"{mnt}/{name}", "rb") as f:
        got = f.read(len(want))
    if got != want:
        fail(f"{name} on host {host} does not hold host 2's later write: {got[:16]!r}")


def unlink_syncfs(host, mnt):
    # Files written, closed and removed: the times the kernel writes back for them must
    # not turn into a failed syncfs.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for i in range(5):
        path = f"{mnt}/gone{i}"
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
            if i % 2:
                os.fsync(f.fileno())
        if i == 4:
            keep = open(path, "rb")
        os.unlink(path)
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        rc = libc.syncfs(fd)
        err = ctypes.get_errno()
        os.close(fd)
        if rc != 0:
            fail(f"syncfs after removing a file on host {host}: {os.strerror(err)}")
    if keep.read() != b"x" * 4096:
        fail(f"a file open after its removal on host {host} no longer reads back")


def main():
    action, host, mnt, *args = sys.argv[1:]
    globals()[action.replace("-", "_")](int(host), mnt, *args)


if __name__ == "__main__":
    main()
