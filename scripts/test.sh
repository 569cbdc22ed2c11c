#!/usr/bin/env bash
# The whole test suite on a fresh machine, as root: installs what the tests use (fuse3,
# SoftHSM2 and OpenSC for PKCS#11, systemd's analyzer, moto for a local KMS), then runs
# `cargo test --locked` with the FUSE, PKCS#11 and KMS suites on, and the two-host
# battery on JuiceFS (scripts/fleet-battery.sh). Mounting tests need
# /dev/fuse. (Plain `cargo test` runs anywhere, as any user: those suites show as ignored.)
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v setpriv >/dev/null || missing+=(util-linux)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -c /dev/fuse ] || { echo "test.sh: /dev/fuse is missing" >&2; exit 1; }
# A KMS-speaking server for the aws-kms tests (boto3 comes with it).
command -v moto_server >/dev/null || python3 -m pip install -q moto flask flask-cors

# A mount left over from an earlier run would break this one.
awk '$3 ~ /^fuse/ && $2 ~ /envelopefs-test/ {print $2}' /proc/mounts | xargs -r -n1 umount -l

# A one-off build gains nothing from incremental state but a few GB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test --locked --features fuse_tests,pkcs11_tests,kms_tests "$@"
# The concurrency tests of the inode table run under shuttle (src/sync.rs).
cargo test --locked --features shuttle --lib fs::inodes
# Two hosts on JuiceFS share one volume (docs/SHARING.md); installs Redis, JuiceFS, socat.
./scripts/fleet-battery.sh target/debug/envelopefs
