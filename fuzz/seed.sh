#!/usr/bin/env bash
# Fill fuzz/corpus/<target>/ with seeds from the fixture volumes (tests/fixtures/*/backing):
#   config   every envelopefs.toml
#   keyring  every envelopefs.keyring
#   header   the first header_size bytes of every other regular file (header_size read from
#            that volume's envelopefs.toml)
#   names    every entry name, symlink target and long-name side file of the volumes
#   journal  a crash journal with a path record and each kind of change (docs/FORMAT.md §8)
# Safe to rerun: seeds are named by volume and path and overwritten. Corpora are not committed.
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$fuzz_dir")"
corpus="$fuzz_dir/corpus"
mkdir -p "$corpus/config" "$corpus/keyring" "$corpus/header" "$corpus/names" "$corpus/journal"

shopt -s nullglob
backings=("$repo"/tests/fixtures/*/backing)
if [ ${#backings[@]} -eq 0 ]; then
    echo "seed.sh: no tests/fixtures/*/backing found" >&2
    exit 1
fi

for backing in "${backings[@]}"; do
    volume="$(basename "$(dirname "$backing")")"
    toml="$backing/envelopefs.toml"
    if [ ! -f "$toml" ]; then
        echo "seed.sh: $volume has no envelopefs.toml, skipped" >&2
        continue
    fi
    cp "$toml" "$corpus/config/$volume.toml"
    if [ -f "$backing/envelopefs.keyring" ]; then
        cp "$backing/envelopefs.keyring" "$corpus/keyring/$volume.keyring"
    fi
    header_size="$(sed -n 's/^[[:space:]]*header_size[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$toml" | head -n 1)"
    if [ -z "$header_size" ]; then
        echo "seed.sh: $toml has no header_size" >&2
        exit 1
    fi
    # Regular files only (no symlinks), not the volume's own files, not empty ones (no header yet).
    while IFS= read -r -d '' file; do
        rel="${file#"$backing"/}"
        case "$rel" in envelopefs.toml | envelopefs.keyring) continue ;; esac
        [ -s "$file" ] || continue
        head -c "$header_size" "$file" >"$corpus/header/$volume--${rel//\//_}"
    done < <(find "$backing" -type f -print0)
    n=0
    while IFS= read -r -d '' entry; do
        n=$((n + 1))
        printf '%s' "$(basename "$entry")" >"$corpus/names/$volume-name-$n"
        if [ -L "$entry" ]; then
            printf '%s' "$(readlink "$entry")" >"$corpus/names/$volume-target-$n"
        elif [ -f "$entry" ] && [ "${entry%.name}" != "$entry" ]; then
            cp "$entry" "$corpus/names/$volume-side-$n"
        fi
    done < <(find "$backing" -mindepth 1 -print0)
done

# A journal with a path record and each kind of change (overwrite, append, length).
python3 - "$corpus/journal/seed.journal" <<'PY'
import struct, sys, zlib
fid = bytes(range(16))
def frame(body):
    return struct.pack("<II", len(body) + 4, zlib.crc32(body)) + body
def head(seq, kind):
    return struct.pack("<QB", seq, kind) + fid
recs = [
    head(1, 1) + struct.pack("<QH", 42, 5) + b"a/b.c",
    head(2, 2) + struct.pack("<QQBI", 4096, 8192, 1, 4) + b"data",
    head(3, 2) + struct.pack("<QQBI", 8192, 12316, 0, 1) + struct.pack("<II", 4124, 7),
    head(4, 2) + struct.pack("<QQBI", 100, 100, 0, 0),
]
out = b"EFSJRNL1" + bytes(16) + bytes(8) + b"".join(frame(r) for r in recs)
open(sys.argv[1], "wb").write(out)
PY

for t in config keyring header names journal; do
    echo "$t: $(find "$corpus/$t" -type f | wc -l) seeds"
done
