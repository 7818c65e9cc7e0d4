#!/usr/bin/env bash
# Benchmark strata's NBD server against qemu-nbd: the same client workloads on
# the same kind of image, in one run, over a Unix socket.
#   - sequential 1 MiB writes and reads (qemu-img bench, queue depth 8);
#   - scattered 4 KiB writes and reads (qemu-img bench with a large prime stride
#     so consecutive requests land far apart; queue depth 16), reported as IOPS;
#   - nbdcopy of the whole disk out (to null:) and in (from a raw file).
# Each workload runs against a fresh qcow2 image (reads against one filled by
# the sequential write pass). Ratio = qemu-nbd time / strata time (> 1: strata
# is faster).
# Usage: scripts/bench-nbd.sh   (env: BENCH_SIZE_MB=1024 BENCH_RUNS=3
#        BENCH_ONLY="seq-write-1M ..." BENCH_4K_COUNT=100000 STRATA=path WORK=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${BENCH_SIZE_MB:-1024}
WORK=${WORK:-$PWD/bench-work/nbd}
STRATA=${STRATA:-}
if [ -z "$STRATA" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -q -p strata-cli
  STRATA=${CARGO_TARGET_DIR:-target}/release/strata
fi
for t in qemu-img qemu-nbd nbdcopy; do
  command -v "$t" >/dev/null || { echo "bench-nbd: $t is required" >&2; exit 1; }
done
mkdir -p "$WORK"
SOCK=$WORK/nbd.sock
IMG=$WORK/disk.qcow2
SRC=$WORK/src.raw
PID=

now() { date +%s.%N; }
stop_server() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
  fi
  rm -f "$SOCK"
}
trap stop_server EXIT

start_server() { # $1 = strata|qemu
  rm -f "$SOCK"
  if [ "$1" = strata ]; then
    "$STRATA" nbd serve -k "$SOCK" -x disk -f qcow2 "$IMG" 2>/dev/null &
  else
    qemu-nbd -k "$SOCK" -x disk -f qcow2 --shared=16 --cache=writeback --aio=threads -t "$IMG" &
  fi
  PID=$!
  for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "bench-nbd: $1 server did not start" >&2; exit 1
}

URI="nbd+unix:///disk?socket=$SOCK"
MB=$((SIZE_MB))
N4K=${BENCH_4K_COUNT:-100000}
RUNS=${BENCH_RUNS:-3}
ONLY=${BENCH_ONLY:-seq-write-1M seq-read-1M rand-write-4k rand-read-4k nbdcopy-out nbdcopy-in}
STRIDE=$((4096 * 7919))

fresh() { rm -f "$IMG"; qemu-img create -q -f qcow2 "$IMG" "${SIZE_MB}M"; }
filled() { fresh; qemu-img convert -n -O qcow2 -f raw "$SRC" "$IMG" 2>/dev/null || qemu-img convert -f raw -O qcow2 "$SRC" "$IMG"; }

# A source with data in every MiB (not all zeroes, so nothing is skipped).
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" -ne $((SIZE_MB << 20)) ]; then
  head -c $((SIZE_MB << 20)) /dev/urandom > "$SRC"
fi

# workload name -> command (run against $URI)
run_workload() {
  case "$1" in
    seq-write-1M) qemu-img bench -q -w -f raw -t none -s 1M -d 8 -c "$MB" "$URI" ;;
    seq-read-1M) qemu-img bench -q -f raw -t none -s 1M -d 8 -c "$MB" "$URI" ;;
    rand-write-4k) qemu-img bench -q -w -f raw -t none -s 4k -S "$STRIDE" -d 16 -c "$N4K" "$URI" ;;
    rand-read-4k) qemu-img bench -q -f raw -t none -s 4k -S "$STRIDE" -d 16 -c "$N4K" "$URI" ;;
    nbdcopy-out) nbdcopy "$URI" null: ;;
    nbdcopy-in) nbdcopy "$SRC" "$URI" ;;
  esac
}

prepare() {
  case "$1" in
    seq-read-1M|rand-read-4k|nbdcopy-out) filled ;;
    *) fresh ;;
  esac
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo "runs per workload and server: $RUNS (median shown; servers alternate which goes first)"
printf '%-14s %12s %12s %8s   %s\n' workload strata_s qemu-nbd_s ratio "throughput (strata / qemu-nbd)"
for w in $ONLY; do
  declare -A S=([strata]="" [qemu]="")
  for r in $(seq "$RUNS"); do
    if [ $((r % 2)) -eq 1 ]; then order="strata qemu"; else order="qemu strata"; fi
    for srv in $order; do
      prepare "$w"
      # Write back what preparing (and the previous run) left dirty, so neither
      # server's final flush pays for the other's or the setup's writes.
      sync
      start_server "$srv"
      t0=$(now); run_workload "$w" >/dev/null; t1=$(now)
      stop_server
      S[$srv]+="$(echo "$t1 - $t0" | bc -l) "
    done
  done
  declare -A T=()
  for srv in strata qemu; do T[$srv]=$(echo "${S[$srv]}" | tr ' ' '\n' | grep . | median); done
  ratio=$(echo "${T[qemu]} / ${T[strata]}" | bc -l)
  case "$w" in
    *-4k) unit=$(printf '%.0f / %.0f IOPS' "$(echo "$N4K / ${T[strata]}" | bc -l)" "$(echo "$N4K / ${T[qemu]}" | bc -l)") ;;
    *) unit=$(printf '%.0f / %.0f MiB/s' "$(echo "$MB / ${T[strata]}" | bc -l)" "$(echo "$MB / ${T[qemu]}" | bc -l)") ;;
  esac
  printf '%-14s %12.3f %12.3f %8.2fx   %s\n' "$w" "${T[strata]}" "${T[qemu]}" "$ratio" "$unit"
  unset S T
done
rm -f "$IMG"
