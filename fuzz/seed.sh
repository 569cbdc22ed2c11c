#!/usr/bin/env bash
# Fill fuzz/corpus/<target>/ with seeds from the fixture volumes (tests/fixtures/*/backing):
#   config   every envelopefs.toml
#   keyring  every envelopefs.keyring
#   header   the first header_size bytes of every other regular file (header_size read from
#            that volume's envelopefs.toml)
# Safe to rerun: seeds are named by volume and path and overwritten. Corpora are not committed.
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$fuzz_dir")"
corpus="$fuzz_dir/corpus"
mkdir -p "$corpus/config" "$corpus/keyring" "$corpus/header"

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
done

for t in config keyring header; do
    echo "$t: $(find "$corpus/$t" -type f | wc -l) seeds"
done
