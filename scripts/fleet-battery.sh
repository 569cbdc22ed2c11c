#!/usr/bin/env bash
# The shared-volume battery on a real distributed filesystem (docs/SHARING.md): two hosts
# (scripts/fleet-juicefs.sh: JuiceFS with its metadata in Redis, each host in its own
# network and mount namespace), one KMS key in moto reached by both, one shared volume,
# an envelopefs daemon on each host. Stops at the first failure; leaves nothing behind.
#
#   scripts/fleet-battery.sh [ENVELOPEFS_BINARY]      (root; default target/debug/envelopefs)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/debug/envelopefs}")
export FLEET_DIR=${FLEET_DIR:-/tmp/envelopefs-fleet}
NET=${FLEET_NET:-10.77.0}
FLEET="$PWD/scripts/fleet-juicefs.sh"
PY="$PWD/scripts/fleet_battery.py"
KMS_PORT=5111
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1

command -v socat >/dev/null || { apt-get update -qq && apt-get install -y -qq socat >/dev/null; }
command -v moto_server >/dev/null || python3 -m pip install -q moto flask flask-cors

moto_pid=
cleanup() {
  "$FLEET" down || true
  [ -z "$moto_pid" ] || kill "$moto_pid" 2>/dev/null || true
}
trap cleanup EXIT
t0=$(date +%s)
"$FLEET" up >/dev/null

step() { echo "== $(($(date +%s) - t0))s: $*"; }
host() { local n=$1; shift; "$FLEET" run "$n" env ENVELOPEFS_TRUST_DIR="$FLEET_DIR/h$n/trust" "$@"; }
jfs() { echo "$FLEET_DIR/h$1/jfs"; }
mnt() { echo "$FLEET_DIR/h$1/efs"; }
py() { local n=$1 action=$2; shift 2; host "$n" python3 "$PY" "$action" "$n" "$(mnt "$n")" "$@"; }
both() { py 1 "$@" & local a=$!; py 2 "$@" & local b=$!; wait "$a"; wait "$b"; }
mount_host() {
  mkdir -p "$(mnt "$1")"
  host "$1" "$BIN" mount --log-file "$FLEET_DIR/h$1/envelopefs.log" "$(jfs "$1")/${2:-vol}" "$(mnt "$1")"
}

step "KMS: moto on the bridge; each host reaches it on its own loopback, as through a local endpoint"
moto_server -H "$NET.1" -p "$KMS_PORT" >"$FLEET_DIR/moto.log" 2>&1 &
moto_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$NET.1/$KMS_PORT") 2>/dev/null && break; sleep 0.1; done
ARN=$(python3 -c "import boto3; c = boto3.client('kms', endpoint_url='http://$NET.1:$KMS_PORT'); \
  print(c.create_key()['KeyMetadata']['Arn'])")
for n in 1 2; do
  mkdir -p "$FLEET_DIR/h$n/trust"
  "$FLEET" run "$n" socat "TCP-LISTEN:$KMS_PORT,bind=127.0.0.1,fork,reuseaddr" "TCP:$NET.1:$KMS_PORT" 2>/dev/null &
done
for n in 1 2; do
  for _ in $(seq 50); do "$FLEET" run "$n" bash -c "exec 3<>/dev/tcp/127.0.0.1/$KMS_PORT" 2>/dev/null && break; sleep 0.1; done
done

step "a shared volume, made on host 1, trusted on host 2, mounted on both"
host 1 mkdir "$(jfs 1)/vol"
host 1 "$BIN" init --shared --provider aws-kms --key-id "$ARN" --kms-endpoint "http://127.0.0.1:$KMS_PORT" \
  "$(jfs 1)/vol" >/dev/null
host 2 "$BIN" trust --yes "$(jfs 2)/vol" >/dev/null
mount_host 1
mount_host 2
py 1 setup

step "concurrent first writes of 20 empty files: one header each"
both header-race
py 1 check-header-race
py 2 check-header-race

step "disjoint bytes of one block, with fsync, in 20 files"
both disjoint
py 1 check-disjoint
py 2 check-disjoint

step "appends to one file under an fcntl lock: 100 records from each host"
both appends
py 1 check-appends
py 2 check-appends

step "an fcntl lock held on host 1 stops host 2"
py 1 hold-lock 3 >"$FLEET_DIR/held" &
holder=$!
for _ in $(seq 100); do grep -q held "$FLEET_DIR/held" 2>/dev/null && break; sleep 0.05; done
py 2 try-lock EAGAIN
wait "$holder"
py 2 try-lock granted

step "SQLite (rollback journal): a writer on each host, 100 transactions each"
# JuiceFS alone first, for comparison (reported, not checked).
raw() { local n=$1 action=$2; host "$n" python3 "$PY" "$action" "$n" "$(jfs "$n")"; }
raw 1 sqlite-init
raw 1 sqlite-writer 2>/dev/null & a=$!; raw 2 sqlite-writer 2>/dev/null & b=$!
wait "$a" && ra=ok || ra=failed; wait "$b" && rb=ok || rb=failed
echo "   JuiceFS alone: writers $ra and $rb; $(raw 1 sqlite-report)"
py 1 sqlite-init
both sqlite-writer
py 1 check-sqlite
py 2 check-sqlite
echo "   envelopefs: $(py 2 sqlite-report)"

step "tar made on host 1, unpacked on host 2"
host 1 tar cf "$(mnt 1)/src.tar" -C "$PWD" src
host 2 mkdir "$(mnt 2)/untar"
host 2 tar xf "$(mnt 2)/src.tar" -C "$(mnt 2)/untar"
host 2 diff -r "$PWD/src" "$(mnt 2)/untar/src"

step "git: a commit on each host, git fsck on the other"
git_as() { local n=$1; shift; host "$n" git -c user.name=fleet -c user.email=fleet@localhost -C "$(mnt "$n")/repo" "$@"; }
host 1 git init -q "$(mnt 1)/repo"
host 1 cp -r "$PWD/src" "$(mnt 1)/repo/"
git_as 1 add -A
git_as 1 commit -qm "from host 1"
git_as 2 fsck --full --strict
host 2 cp "$PWD/Cargo.toml" "$(mnt 2)/repo/"
git_as 2 add -A
git_as 2 commit -qm "from host 2"
git_as 1 fsck --full --strict
[ "$(git_as 1 rev-list --count HEAD)" = 2 ]

step "kill -9 of host 1 in the middle of writes while host 2 writes on; then host 1 recovers"
py 1 overwrite shared-k one
py 1 overwrite-loop k1 ones &
w1=$!
py 2 overwrite-loop k2 twos &
w2=$!
sleep 1
pkill -9 -f " mount --log-file $FLEET_DIR/h1/envelopefs.log" || { echo "no daemon on host 1" >&2; exit 1; }
wait "$w1" || true
py 2 overwrite shared-k two
sleep 1
pkill -f "fleet_battery.py overwrite-loop 2 $(mnt 2)" || true
wait "$w2" || true
mount_host 1
py 1 check-block shared-k two
py 2 check-block shared-k two
host 1 cat "$(mnt 1)/k1" "$(mnt 1)/k2" >/dev/null
grep -h "crash recovery" "$FLEET_DIR/h1/envelopefs.log" || echo "   (host 1's recovery found nothing to put right)"

step "unmounted everywhere, fsck is clean"
host 1 "$BIN" umount "$(mnt 1)"
host 2 "$BIN" umount "$(mnt 2)"
host 1 "$BIN" fsck "$(jfs 1)/vol"

step "a volume that is not shared: files removed after writing leave syncfs clean; a second host is refused (exit 17)"
host 1 mkdir "$(jfs 1)/plain"
host 1 "$BIN" init --provider aws-kms --key-id "$ARN" --kms-endpoint "http://127.0.0.1:$KMS_PORT" \
  "$(jfs 1)/plain" >/dev/null
host 2 "$BIN" trust --yes "$(jfs 2)/plain" >/dev/null
mount_host 1 plain
py 1 unlink-syncfs
rc=0
mount_host 2 plain 2>"$FLEET_DIR/refused" || rc=$?
[ "$rc" = 17 ] || { echo "second mount of a plain volume: exit $rc" >&2; cat "$FLEET_DIR/refused" >&2; exit 1; }
host 1 "$BIN" umount "$(mnt 1)"

step "passed"
