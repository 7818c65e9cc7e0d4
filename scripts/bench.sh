#!/usr/bin/env bash
# Run the same work through qemu-img and strata in one run and print the ratios.
#
#   bash scripts/bench.sh                 # 4 GiB image, best of 3 runs
#   BENCH_SIZE=1G BENCH_RUNS=1 bash scripts/bench.sh
#   BENCH_ONLY='map|check' bash scripts/bench.sh   # only operations whose name matches
#   STRATA=/path/to/old/strata bash scripts/bench.sh   # another build, e.g. before a change
#   BENCH_SYNCS=1 bash scripts/bench.sh   # also count each tool's fdatasync/fsync calls
#
# The input disk is half incompressible data, a quarter compressible text and a
# quarter zeroes (holes). Each operation runs alternately through both tools; the
# best time of each is kept (page cache warm for both). Ratio = strata / qemu-img:
# below 1.0 strata is faster.
#
# On a loaded machine the times of the quick operations (amend, snapshots: tens of
# milliseconds, mostly flushes) are noisy; BENCH_SYNCS=1 adds a work count that is
# not: one more untimed run of each tool under strace, counting its file syncs
# (fdatasync and fsync), printed as "syncs q/s".
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-3}
WORK=${BENCH_DIR:-$PWD/bench-work}
# STRATA=path measures another build (an older one, to compare before and after).
if [ -z "${STRATA:-}" ]; then
  cargo build --release -q -p strata-cli
  STRATA=$PWD/target/release/strata
fi
mkdir -p "$WORK"
trap 'rm -f "$WORK"/out.*' EXIT

bytes=$("$STRATA" img measure --size "$SIZE" -O raw --output=json | sed -n 's/.*"required": *\([0-9]*\).*/\1/p')
[ -n "$bytes" ] || bytes=$(numfmt --from=iec "$SIZE")
src_raw="$WORK/src-$SIZE.raw"
src_q="$WORK/src-$SIZE.qcow2"
if [ ! -f "$src_raw" ]; then
  echo "bench: generating $SIZE input in $WORK"
  python3 - "$src_raw" "$bytes" <<'PY'
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
noise = rnd.randbytes(1 << 20)
text = (b"strata benchmark: compressible guest data block %d\n" * 20000)[: 1 << 20]
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(size >> 20):
        kind = i % 8
        if kind in (5, 6):
            continue                      # zeroes: left as a hole
        f.seek(i << 20)
        if kind in (0, 1, 2):
            f.write(i.to_bytes(8, "little") + noise[8:])
        elif kind in (3, 4):
            f.write(text)
        else:
            f.write(noise[: 1 << 19])    # half data, half zeroes
PY
  qemu-img convert -f raw -O qcow2 "$src_raw" "$src_q"
fi

# Clock reads without a fork (bash's EPOCHREALTIME, in microseconds): operations of a
# few milliseconds must not be measured together with the start of `date`.
time_one() { # tool args... -> microseconds of one run
  local t0 t1
  rm -f "$WORK"/out.*
  # Settle the previous run's output (writeback, and the discards its removal
  # queues on a discard-mounted file system) outside the timed region.
  sync
  t0=${EPOCHREALTIME/./}; "$@" >/dev/null; t1=${EPOCHREALTIME/./}
  echo $((t1 - t0))
}
# Operations faster than this (in microseconds) run QUICK_RUNS times: their best of
# three would be mostly noise.
QUICK=100000
QUICK_RUNS=${BENCH_QUICK_RUNS:-15}

SYNCS=${BENCH_SYNCS:-0}
if [ "$SYNCS" = 1 ] && ! command -v strace >/dev/null; then
  echo "bench: BENCH_SYNCS=1 needs strace" >&2
  exit 1
fi
# The file syncs (fdatasync, fsync) of one run of a command, all threads counted.
count_syncs() { # args... -> count
  local log="$WORK/out.strace"
  strace -f -qq -o "$log" -e trace=fdatasync,fsync "$@" >/dev/null
  grep -cE '(fdatasync|fsync)\(' "$log" || true
}
# One result line: name target qemu-us strata-us [qemu-syncs strata-syncs].
report() {
  awk -v n="$1" -v tg="$2" -v q="$3" -v s="$4" -v sq="${5:-}" -v ss="${6:-}" \
    'BEGIN { printf "%-28s %12.3f %12.3f %8.2f %8s", n, q/1e6, s/1e6, s/q, tg
             if (sq != "") printf " %9s", sq "/" ss
             printf "\n" }'
}
if [ "$SYNCS" = 1 ]; then
  printf "%-28s %12s %12s %8s %8s %9s\n" "operation ($SIZE)" "qemu-img s" "strata s" "ratio" "target" "syncs q/s"
else
  printf "%-28s %12s %12s %8s %8s\n" "operation ($SIZE)" "qemu-img s" "strata s" "ratio" "target"
fi
ONLY=${BENCH_ONLY:-.}
wanted() { printf '%s\n' "$1" | grep -Eq -- "$ONLY"; }
bench() { # name target args-after-tool...
  local name=$1 target=$2; shift 2
  wanted "$name" || return 0
  local bq=999999999999 bs=999999999999 t
  local runs=$RUNS i=0
  while [ "$i" -lt "$runs" ]; do
    t=$(time_one qemu-img "$@"); [ "$t" -lt "$bq" ] && bq=$t
    t=$(time_one "$STRATA" img "$@"); [ "$t" -lt "$bs" ] && bs=$t
    i=$((i + 1))
    [ "$bq" -lt "$QUICK" ] && [ "$runs" -lt "$QUICK_RUNS" ] && runs=$QUICK_RUNS
  done
  local sq= ss=
  if [ "$SYNCS" = 1 ]; then
    rm -f "$WORK"/out.*; sq=$(count_syncs qemu-img "$@")
    rm -f "$WORK"/out.*; ss=$(count_syncs "$STRATA" img "$@")
  fi
  report "$name" "$target" "$bq" "$bs" "$sq" "$ss"
}

bench "convert qcow2->raw"      "<=0.8" convert -O raw "$src_q" "$WORK/out.raw"
bench "convert raw->qcow2"      "<=0.8" convert -f raw -O qcow2 "$src_raw" "$WORK/out.qcow2"
bench "convert qcow2->qcow2"    "<=0.8" convert -O qcow2 "$src_q" "$WORK/out.qcow2"
bench "convert -c zlib"         "<=0.5" convert -c -O qcow2 -o compression_type=zlib "$src_q" "$WORK/out.qcow2"
bench "convert -c zstd"         "<=0.5" convert -c -O qcow2 -o compression_type=zstd "$src_q" "$WORK/out.qcow2"
# Other tools' formats: sources made once by qemu-img (untimed).
src_vmdk="$WORK/src-$SIZE.vmdk"; src_vhdx="$WORK/src-$SIZE.vhdx"
if wanted "vmdk|vhdx"; then
  [ -e "$src_vmdk" ] || qemu-img convert -O vmdk "$src_q" "$src_vmdk"
  [ -e "$src_vhdx" ] || qemu-img convert -O vhdx "$src_q" "$src_vhdx"
fi
bench "convert qcow2->vmdk"     "<=0.8" convert -O vmdk "$src_q" "$WORK/out.vmdk"
bench "convert ->vmdk stream"   "<=0.5" convert -O vmdk -o subformat=streamOptimized "$src_q" "$WORK/out.vmdk"
bench "convert qcow2->vpc"      "<=0.8" convert -O vpc "$src_q" "$WORK/out.vhd"
bench "convert qcow2->vhdx"     "<=0.8" convert -O vhdx "$src_q" "$WORK/out.vhdx"
bench "convert qcow2->vdi"      "<=0.8" convert -O vdi "$src_q" "$WORK/out.vdi"
bench "convert vmdk->qcow2"     "<=0.8" convert -O qcow2 "$src_vmdk" "$WORK/out.qcow2"
bench "convert vhdx->raw"       "<=0.8" convert -O raw "$src_vhdx" "$WORK/out.raw"
bench "convert qcow2->qed"      "<=0.8" convert -O qed "$src_q" "$WORK/out.qed"
bench "convert qcow2->parallels" "<=0.8" convert -O parallels "$src_q" "$WORK/out.hds"
bench "map --output=json"       "<=0.5" map --output=json "$src_q"
bench "check"                   "<=0.5" check "$src_q"
bench "info"                    "-"     info "$src_q"

# ---- amend and bitmap: each timed run is undone by qemu-img (untimed), so both
# tools always start from the same image ----
undo_bench() { # name target "timed args" "undo args" [args after the image]
  local name=$1 target=$2 timed=$3 undo=$4 after=${5:-}
  wanted "$name" || return 0
  local img="$WORK/edit-$SIZE.qcow2" bq=999999999999 bs=999999999999 t
  cp "$src_q" "$img"
  case $name in bitmap*) qemu-img bitmap --add "$img" keep ;; esac
  for _ in $(seq "$(( RUNS > 5 ? RUNS : 5 ))"); do
    for tool in qemu-img strata; do
      local cmd=("$tool"); [ "$tool" = strata ] && cmd=("$STRATA" img)
      # shellcheck disable=SC2086
      t0=${EPOCHREALTIME/./}; "${cmd[@]}" $timed "$img" $after >/dev/null; t1=${EPOCHREALTIME/./}
      # shellcheck disable=SC2086
      qemu-img $undo "$img" $after
      t=$((t1 - t0))
      if [ "$tool" = qemu-img ]; then [ "$t" -lt "$bq" ] && bq=$t; else [ "$t" -lt "$bs" ] && bs=$t; fi
    done
  done
  local sq= ss=
  if [ "$SYNCS" = 1 ]; then
    # shellcheck disable=SC2086
    sq=$(count_syncs qemu-img $timed "$img" $after); qemu-img $undo "$img" $after
    # shellcheck disable=SC2086
    ss=$(count_syncs "$STRATA" img $timed "$img" $after); qemu-img $undo "$img" $after
  fi
  rm -f "$img"
  report "$name" "$target" "$bq" "$bs" "$sq" "$ss"
}
undo_bench "amend refcount_bits=64"  "<=1.0" "amend -o refcount_bits=64" "amend -o refcount_bits=16"
undo_bench "amend compat=0.10"       "<=1.0" "amend -o compat=0.10" "amend -o compat=1.1"
undo_bench "amend lazy_refcounts=on" "<=1.0" "amend -o lazy_refcounts=on" "amend -o lazy_refcounts=off"
undo_bench "bitmap --add"            "<=1.0" "bitmap --add" "bitmap --remove" new
undo_bench "bitmap --clear"          "<=1.0" "bitmap --clear" "bitmap --enable" keep

# ---- internal snapshots (create, list, apply, delete) ----
wanted snapshot || exit 0
# A fully written image; each sequence creates "bench", lists, applies it (a no-op
# revert to the state just saved) and deletes it, so the image ends as it started and
# both tools work on the same file.
full="$WORK/full-$SIZE.qcow2"
if [ ! -f "$full" ]; then
  echo "bench: writing every cluster of $full"
  # qemu-io requests are limited in size: fill the image 256 MiB at a time, into a
  # temporary name so an interrupted run never leaves a half-written input behind.
  qemu-img create -q -f qcow2 "$full.tmp" "$SIZE"
  fill=()
  for ((off = 0; off < bytes; off += 256 << 20)); do fill+=(-c "write -P 0x5a $off 256M"); done
  qemu-io -f qcow2 "${fill[@]}" "$full.tmp" >/dev/null
  mv "$full.tmp" "$full"
fi
# One run of snapshot operation $1 (create, list, apply, delete) on image $2 by the
# tool command after them, set up and undone by qemu-img outside the measurement;
# prints its microseconds, or with COUNT=1 its file syncs.
snap_once() {
  local op=$1 img=$2 t0 t1; shift 2
  local args
  case $op in
    create) args=(snapshot -c bench "$img") ;;
    list) args=(snapshot -l "$img") ;;
    apply) args=(snapshot -a bench "$img") ;;
    *) args=(snapshot -d bench "$img") ;;
  esac
  case $op in apply | delete) qemu-img snapshot -c bench "$img" ;; esac
  if [ "${COUNT:-0}" = 1 ]; then
    count_syncs "$@" "${args[@]}"
  else
    t0=${EPOCHREALTIME/./}; "$@" "${args[@]}" >/dev/null; t1=${EPOCHREALTIME/./}
    echo $((t1 - t0))
  fi
  case $op in create | apply) qemu-img snapshot -d bench "$img" ;; esac
}
snap_bench() { # image label
  local img=$1 label=$2
  wanted "snapshot ($label)" || return 0
  for op in create list apply delete; do
    local bq=999999999999 bs=999999999999 t
    for _ in $(seq "$(( RUNS > 10 ? RUNS : 10 ))"); do
      t=$(snap_once "$op" "$img" qemu-img); [ "$t" -lt "$bq" ] && bq=$t
      t=$(snap_once "$op" "$img" "$STRATA" img); [ "$t" -lt "$bs" ] && bs=$t
    done
    local sq= ss=
    if [ "$SYNCS" = 1 ]; then
      sq=$(COUNT=1 snap_once "$op" "$img" qemu-img)
      ss=$(COUNT=1 snap_once "$op" "$img" "$STRATA" img)
    fi
    report "snapshot $op ($label)" "<=0.5" "$bq" "$bs" "$sq" "$ss"
  done
}
for n in 0 10 100; do
  img="$WORK/snaps-$n-$SIZE.qcow2"
  if [ ! -f "$img" ]; then
    cp "$full" "$img.tmp"
    for i in $(seq "$n"); do qemu-img snapshot -c "s$i" "$img.tmp"; done
    mv "$img.tmp" "$img"
  fi
  snap_bench "$img" "$n snaps"
done
# 1,000 snapshots on a smaller fully written image (256 MiB), to keep setup bounded.
many="$WORK/snaps-1000.qcow2"
if [ ! -f "$many" ]; then
  qemu-img create -q -f qcow2 "$many.tmp" 256M
  qemu-io -f qcow2 -c "write -P 0x33 0 256M" "$many.tmp" >/dev/null
  for i in $(seq 1000); do qemu-img snapshot -c "s$i" "$many.tmp"; done
  mv "$many.tmp" "$many"
fi
snap_bench "$many" "1000 snaps, 256M"
