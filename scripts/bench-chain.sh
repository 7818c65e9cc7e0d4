#!/usr/bin/env bash
# Chain operations, strata against qemu-img on the same inputs in one run; prints
# the ratios (strata / qemu-img: below 1.0 strata is faster).
#
#   bash scripts/bench-chain.sh                       # 4 GiB base, best of 3
#   BENCH_SIZE=1G BENCH_RUNS=1 bash scripts/bench-chain.sh
#   BENCH_ONLY='commit' bash scripts/bench-chain.sh   # operations whose name matches
#
# Inputs (built once with qemu-img/qemu-io, kept in $BENCH_DIR):
#   base.qcow2   BENCH_SIZE virtual, half of it written (256 MiB runs, every other one)
#   top.qcow2    on base: 256 MiB of data in 1 MiB writes spread over the disk
#   c1..c4       a 5-deep chain on base, 256 MiB of 1 MiB writes per layer, at
#                shifted offsets so the layers overlap in part
#   r1..r7       an 8-deep chain on base, 128 MiB per layer, for the read test
# Each timed run works on fresh copies (the copying is not timed). Page cache warm
# for both tools. What is compared:
#   commit 256M overlay      qemu-img commit top        | strata img commit top
#   intermediate commit      qemu-img commit -b c1 c3 + qemu-img rebase -u -b c1 c4
#                            | strata img commit --top c3 -b c1 c4   (c2,c3 into c1, c4 relinked)
#   rebase -b '' (5-deep)    qemu-img rebase -b '' c4   | strata img rebase -b '' c4
#   stream (5-deep)          qemu-img rebase -b '' c4   | strata img stream c4   (same result)
#   stream vs convert        qemu-img convert -t writeback -O qcow2 c4 new | strata img stream c4
#                            (convert's default cache mode, unsafe, never flushes; stream
#                            must flush before its relink, so the reference flushes too)
#   8-deep random reads      BENCH_READS random 4 KiB reads (same offsets) through r7 and
#                            through a flat qcow2 copy of it, both by strata's chain reader
#                            (Chain::reader, the indexed view; examples/chain_reads.rs),
#                            files read once beforehand so both are in the page cache;
#                            ratio = 8-deep / flat, in-process time including building the
#                            index. qemu-img bench (strided 4 KiB reads) on the same two
#                            images is printed for reference (QEMU walks every layer).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-3}
READS=${BENCH_READS:-1000000}
WORK=${BENCH_DIR:-$PWD/bench-work}/chain-$SIZE
ONLY=${BENCH_ONLY:-.}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p strata-jobs --example chain_reads
# STRATA=path measures another build (an older one, to compare before and after).
if [ -z "${STRATA:-}" ]; then
  cargo build --release -q -p strata-cli
  STRATA=$CARGO_TARGET_DIR/release/strata
fi
READER=$CARGO_TARGET_DIR/release/examples/chain_reads
mkdir -p "$WORK" "$WORK/run"
trap 'rm -rf "$WORK/run"' EXIT

bytes=$(numfmt --from=iec "$SIZE")
mib=$((bytes >> 20))

# qemu-io commands writing `count` 1 MiB runs of pattern `pat`, spread evenly,
# starting `shift` MiB into each stride.
spread() { # count pat shift
  local count=$1 pat=$2 shift=$3 stride i
  stride=$((mib / count))
  for ((i = 0; i < count; i++)); do
    printf -- '-c\nwrite -P %d %dM 1M\n' "$pat" $(( i * stride + shift % stride ))
  done
}
io() { # file, then lines of qemu-io arguments on stdin
  local f=$1
  mapfile -t a
  qemu-io -f qcow2 "${a[@]}" "$f" >/dev/null
}

if [ ! -f "$WORK/ready" ]; then
  echo "bench-chain: building inputs ($SIZE) in $WORK"
  rm -f "$WORK"/*.qcow2
  qemu-img create -q -f qcow2 "$WORK/base.qcow2" "$SIZE"
  for ((off = 0; off < mib; off += 512)); do
    printf -- '-c\nwrite -P %d %dM 256M\n' $(( (off / 512) % 200 + 1 )) "$off"
  done | io "$WORK/base.qcow2"
  mk() { # name backing mib-of-data pat shift
    qemu-img create -q -f qcow2 -b "$2" -F qcow2 "$WORK/$1" "$SIZE"
    spread "$3" "$4" "$5" | io "$WORK/$1"
  }
  mk top.qcow2 base.qcow2 256 201 3
  prev=base.qcow2
  for k in 1 2 3 4; do mk "c$k" "$prev" 256 $((210 + k)) $((k * 2)); prev=c$k; done
  prev=base.qcow2
  for k in 1 2 3 4 5 6 7; do mk "r$k" "$prev" 128 $((220 + k)) $((k * 3)); prev=r$k; done
  qemu-img convert -O qcow2 "$WORK/r7" "$WORK/flat.qcow2"
  touch "$WORK/ready"
fi

now() { date +%s%N; }
wanted() { printf '%s\n' "$1" | grep -Eq -- "$ONLY"; }
R=$WORK/run
fresh() { # files to copy into run/
  rm -rf "$R"; mkdir -p "$R"
  local f
  for f in "$@"; do cp --sparse=always "$WORK/$f" "$R/$f"; done
  for f in "$WORK"/*; do
    [ -e "$R/$(basename "$f")" ] || [ "$(basename "$f")" = run ] || ln -s "$f" "$R/$(basename "$f")"
  done
  sync
}
timed() { # command... -> microseconds
  local t0 t1
  t0=$(now); (cd "$R" && "$@" >/dev/null 2>"$WORK/last.err"); t1=$(now)
  echo $(( (t1 - t0) / 1000 ))
}
printf "%-26s %11s %11s %7s %7s\n" "operation ($SIZE base)" "qemu-img s" "strata s" "ratio" "target"
report() { awk -v n="$1" -v q="$2" -v s="$3" -v tg="$4" \
  'BEGIN { printf "%-26s %11.3f %11.3f %7.2f %7s\n", n, q/1e6, s/1e6, s/q, tg }'; }

bench() { # name target "files to copy" "qemu command" "strata command"
  local name=$1 target=$2 files=$3 qcmd=$4 scmd=$5
  wanted "$name" || return 0
  local bq=999999999999 bs=999999999999 t
  for _ in $(seq "$RUNS"); do
    # shellcheck disable=SC2086
    fresh $files; t=$(timed bash -c "$qcmd"); [ "$t" -lt "$bq" ] && bq=$t
    # shellcheck disable=SC2086
    fresh $files; t=$(timed bash -c "$scmd"); [ "$t" -lt "$bs" ] && bs=$t
    # Both leave the same guest view (checked once per run, untimed).
    qemu-img check -q "$R/$(echo $files | awk '{print $NF}')" || { echo "check failed: $name"; exit 1; }
  done
  report "$name" "$bq" "$bs" "$target"
}

bench "commit 256M overlay" "<=0.7" "base.qcow2 top.qcow2" \
  "qemu-img commit -q top.qcow2" "$STRATA img commit -q top.qcow2"
bench "intermediate commit" "<=0.7" "c1 c2 c3 c4" \
  "qemu-img commit -q -b c1 c3 && qemu-img rebase -u -b c1 -F qcow2 c4" \
  "$STRATA img commit -q --top c3 -b c1 c4"
bench "rebase -b '' (5-deep)" "<=0.7" "c4" \
  "qemu-img rebase -b '' c4" "$STRATA img rebase -b '' c4"
bench "stream (5-deep)" "<=0.7" "c4" \
  "qemu-img rebase -b '' c4" "$STRATA img stream c4"
bench "stream vs convert" "<=0.7" "c4" \
  "qemu-img convert -t writeback -O qcow2 c4 new.qcow2" "$STRATA img stream c4"

if wanted "8-deep random reads"; then
  best() { # image -> best seconds of RUNS
    local b=999999 t i
    for i in $(seq "$RUNS"); do
      t=$("$READER" "$WORK/$1" "$READS" | awk '{print $1}')
      b=$(awk -v a="$b" -v t="$t" 'BEGIN { print (t < a) ? t : a }')
    done
    echo "$b"
  }
  cat "$WORK"/base.qcow2 "$WORK"/r? "$WORK"/flat.qcow2 >/dev/null
  deep=$(best r7); flat=$(best flat.qcow2)
  awk -v n="8-deep random reads" -v f="$flat" -v d="$deep" -v r="$READS" \
    'BEGIN { printf "%-26s %11.3f %11.3f %7.2f %7s   (flat s | 8-deep s, %d x 4 KiB, strata reader)\n", n, f, d, d/f, "<=1.2", r }'
  qb() { # image -> seconds of qemu-img bench
    local t0 t1
    t0=$(now); qemu-img bench -q -f qcow2 -c "$READS" -d 1 -s 4096 -S 1044480 "$WORK/$1" >/dev/null; t1=$(now)
    echo $(( (t1 - t0) / 1000 ))
  }
  awk -v n="  qemu-img bench, ref." -v f="$(qb flat.qcow2)" -v d="$(qb r7)" \
    'BEGIN { printf "%-26s %11.3f %11.3f %7.2f   (flat s | 8-deep s, qemu-img bench -S 1044480)\n", n, f/1e6, d/1e6, d/f }'
fi
