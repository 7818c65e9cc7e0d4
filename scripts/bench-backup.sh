#!/usr/bin/env bash
# Benchmark strata backup against restic (and borg when it is installed) on one
# disk image, in one run on one machine:
#   - full backup of a raw image: 40% random data, 30% compressible text, 30% zeros;
#   - incremental after rewriting 2% of the image (scattered 1 MiB runs): restic
#     and borg read the whole file again (their way); strata twice: reading the
#     whole image, and with --changed-chunks naming the rewritten chunks (what a
#     dirty bitmap gives it);
#   - restore of the latest backup to a file (contents compared with the image);
#   - repository size after both backups, and peak memory of every run
#     (/usr/bin/time -v).
# strata runs once per chunk size in STRATA_CHUNKS (each into its own
# repository), against the same restic and borg runs.
# Ratio = strata / other (< 1: strata is faster or smaller).
# Usage: scripts/bench-backup.sh   (env: BENCH_SIZE_MB=4096 STRATA=path WORK=dir
#        STRATA_CHUNKS="4M 1M" (default 4M; 1M, 2M, 4M, 8M)
#        BENCH_DROP_CACHES=1 to start every run with a cold page cache)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${BENCH_SIZE_MB:-4096}
CHUNKS=${STRATA_CHUNKS:-4M}
for c in $CHUNKS; do
  case $c in 1M | 2M | 4M | 8M) ;; *) echo "bench-backup: chunk size $c is not 1M, 2M, 4M or 8M" >&2; exit 1 ;; esac
done
WORK=$(realpath -m "${WORK:-$PWD/bench-work/backup}")
STRATA=${STRATA:-}
if [ -z "$STRATA" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -q -p strata-cli
  STRATA=${CARGO_TARGET_DIR:-target}/release/strata
fi
STRATA=$(realpath "$STRATA")
for t in restic /usr/bin/time python3; do
  command -v "$t" >/dev/null || { echo "bench-backup: $t is required" >&2; exit 1; }
done
HAVE_BORG=0
command -v borg >/dev/null && HAVE_BORG=1
rm -rf "$WORK"
mkdir -p "$WORK"
IMG=$WORK/disk.raw
export STRATA_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export BORG_BASE_DIR=$WORK/borg-home
unset STRATA_REPOSITORY RESTIC_REPOSITORY RESTIC_PASSWORD_FILE

echo "== making a ${SIZE_MB} MiB image"
RAND_MB=$((SIZE_MB * 40 / 100))
TEXT_MB=$((SIZE_MB * 30 / 100))
head -c "$((RAND_MB << 20))" /dev/urandom >"$IMG"
python3 - "$IMG" "$TEXT_MB" <<'EOF'
import random, sys
path, mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
words = "disk image backup chunk block cluster guest volume kernel journal".split()
with open(path, "ab") as f:
    left = mb << 20
    while left > 0:
        line = " ".join(rnd.choice(words) for _ in range(12)) + f" {rnd.randrange(10**9)}\n"
        block = (line * 64).encode()[:left]
        f.write(block)
        left -= len(block)
EOF
truncate -s "$((SIZE_MB << 20))" "$IMG"

# The 2% change: 1 MiB runs of new random data at scattered offsets.
CHANGE_MB=$((SIZE_MB * 2 / 100))
python3 - "$SIZE_MB" "$CHANGE_MB" "$WORK/change-offsets" <<'EOF'
import random, sys
size_mb, n, plan = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
offsets = sorted(random.Random(11).sample(range(size_mb), n))
with open(plan, "w") as f:
    f.write("\n".join(str(o) for o in offsets))
EOF
# changed_chunks 4M: the chunks of that size the runs touch, for --changed-chunks.
changed_chunks() {
  python3 - "$WORK/change-offsets" "${1%M}" <<'EOF'
import sys
mib = int(sys.argv[2])
print(",".join(str(c) for c in sorted({int(o) // mib for o in open(sys.argv[1])})))
EOF
}
apply_change() {
  python3 - "$IMG" "$WORK/change-offsets" <<'EOF'
import os, sys
path, plan = sys.argv[1], sys.argv[2]
with open(path, "r+b") as f:
    for line in open(plan):
        f.seek(int(line) << 20)
        f.write(os.urandom(1 << 20))
EOF
}

declare -A WALL RSS
# run NAME CMD... : wall seconds and peak RSS (KiB) of CMD
run() {
  local name=$1
  shift
  local log=$WORK/time-$name.log
  sync
  if [ "${BENCH_DROP_CACHES:-0}" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
  /usr/bin/time -v -o "$log" "$@" >"$WORK/out-$name.log" 2>&1 || {
    echo "bench-backup: $name failed:" >&2
    cat "$WORK/out-$name.log" >&2
    exit 1
  }
  WALL[$name]=$(awk -F': ' '/Elapsed \(wall clock\)/ {
      n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$log")
  RSS[$name]=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  printf '  %-28s %8.2f s  %8d MiB peak\n' "$name" "${WALL[$name]}" "$((RSS[$name] / 1024))"
}

echo "== full backups"
for c in $CHUNKS; do
  "$STRATA" backup init --repo "$WORK/strata-$c" >/dev/null
  run "strata-$c-full" "$STRATA" backup create --repo "$WORK/strata-$c" --chunk-size "$c" "$IMG"
done
restic init --repo "$WORK/restic" >/dev/null
run restic-full restic --no-cache --repo "$WORK/restic" backup "$IMG"
if [ $HAVE_BORG = 1 ]; then
  borg init -e repokey "$WORK/borg" >/dev/null 2>&1
  run borg-full borg create --compression zstd,3 "$WORK/borg::full" "$IMG"
fi

echo "== incremental after rewriting ${CHANGE_MB} MiB (2%)"
apply_change
for c in $CHUNKS; do
  run "strata-$c-incr-read-all" "$STRATA" backup create --repo "$WORK/strata-$c" --parent latest "$IMG"
  run "strata-$c-incr-bitmap" "$STRATA" backup create --repo "$WORK/strata-$c" --parent latest \
    --changed-chunks "$(changed_chunks "$c")" "$IMG"
done
run restic-incr restic --no-cache --repo "$WORK/restic" backup "$IMG"
if [ $HAVE_BORG = 1 ]; then
  run borg-incr borg create --compression zstd,3 "$WORK/borg::incr" "$IMG"
fi

echo "== restore of the latest backup"
for c in $CHUNKS; do
  run "strata-$c-restore" "$STRATA" backup restore --repo "$WORK/strata-$c" latest "$WORK/strata-out.raw"
  cmp "$IMG" "$WORK/strata-out.raw"
  rm -f "$WORK/strata-out.raw"
done
run restic-restore restic --no-cache --repo "$WORK/restic" restore latest --target "$WORK/restic-out"
cmp "$IMG" "$WORK/restic-out$IMG"
rm -rf "$WORK/restic-out"
if [ $HAVE_BORG = 1 ]; then
  mkdir -p "$WORK/borg-out"
  pushd "$WORK/borg-out" >/dev/null
  run borg-restore borg extract "$WORK/borg::incr"
  popd >/dev/null
  cmp "$IMG" "$WORK/borg-out$IMG"
  rm -rf "$WORK/borg-out"
fi

echo "== repository sizes"
declare -A SIZE
for t in $(printf 'strata-%s ' $CHUNKS) restic borg; do
  [ -d "$WORK/$t" ] || continue
  SIZE[$t]=$(du -sb "$WORK/$t" | cut -f1)
  printf '  %-8s %8d MiB\n' "$t" "$((SIZE[$t] >> 20))"
done

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo "== ratios (strata / other; targets vs restic: full <= 0.5, incremental <= 0.2, restore <= 0.5, size <= 1)"
for c in $CHUNKS; do
  for other in restic borg; do
    [ -n "${WALL[$other-full]:-}" ] || continue
    echo "  $c chunks vs $other: full $(ratio "${WALL[strata-$c-full]}" "${WALL[$other-full]}")," \
      "incremental $(ratio "${WALL[strata-$c-incr-bitmap]}" "${WALL[$other-incr]}")" \
      "(reading everything: $(ratio "${WALL[strata-$c-incr-read-all]}" "${WALL[$other-incr]}"))," \
      "restore $(ratio "${WALL[strata-$c-restore]}" "${WALL[$other-restore]}")," \
      "repository $(ratio "${SIZE[strata-$c]}" "${SIZE[$other]}")," \
      "peak memory $(ratio "${RSS[strata-$c-full]}" "${RSS[$other-full]}")"
  done
done
