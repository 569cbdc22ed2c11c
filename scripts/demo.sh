#!/usr/bin/env bash
# The main job on a fresh machine: build envelopefs, make a `local` volume, mount it,
# write and read a file through it, show that the backing file and its name are ciphertext,
# unmount.
# Run as root (or a user allowed to use FUSE). Installs fuse3 with apt if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null; then
  echo "== installing fuse3"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
echo "== building (release)"
cargo build --release --locked --quiet
bin=$PWD/target/release/envelopefs

work=$(mktemp -d)
cleanup() { "$bin" umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/backing" "$work/mnt"
# What this host trusts about the throwaway volume goes with it, not into /var/lib/envelopefs.
export ENVELOPEFS_TRUST_DIR="$work/trust"
head -c 32 /dev/urandom > "$work/volume.key"

echo "== envelopefs init"
"$bin" init --key-file "$work/volume.key" "$work/backing"
echo "== envelopefs mount"
"$bin" mount --key-file "$work/volume.key" --log-file "$work/envelopefs.log" "$work/backing" "$work/mnt"
grep " $work/mnt " /proc/mounts

secret="attack at dawn: the plaintext you should never see on disk"
echo "$secret" > "$work/mnt/hello.txt"
echo "== read back through the mount:"
cat "$work/mnt/hello.txt"
echo "== the mount (plaintext sizes):"
ls -l "$work/mnt"
echo "== the backing directory (names hidden; header + sealed blocks):"
ls -l "$work/backing"
if ls "$work/backing" | grep -q hello; then
  echo "FAIL: the file name shows in the backing directory" >&2
  exit 1
fi
backing_file="$work/backing/$("$bin" name encrypt --key-file "$work/volume.key" "$work/backing" hello.txt)"
echo "== hello.txt is stored as $(basename "$backing_file") (envelopefs name encrypt)"
echo "== first bytes of the backing file's first block (nonce, ciphertext, tag):"
od -A d -t x1 -j 4096 -N 64 "$backing_file"
if grep -q "attack at dawn" "$backing_file"; then
  echo "FAIL: plaintext found in the backing file" >&2
  exit 1
fi
echo "ok: neither the name nor the plaintext appears in the backing directory"
echo "== envelopefs inspect --volume (header, no secrets):"
"$bin" inspect --volume "$work/backing" --key-file "$work/volume.key" hello.txt
"$bin" umount "$work/mnt"
echo "== unmounted; demo done"
