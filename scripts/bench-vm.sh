#!/usr/bin/env bash
# Benchmark strata's VM snapshots against libvirt's on the same guest, in one run:
# the test guest (scripts/build-test-guest.sh: its kernel, initrd and a fresh copy of
# its data disk for every case), 1 GiB of memory, 1 vCPU, TCG, booted by `strata vm`
# and by libvirt (a domain XML with direct kernel boot, `virsh define`). For each
# kind -- external disk-only, internal full (disks + memory), external full -- a
# freshly booted guest gets a snapshot created, reverted to and deleted; each
# command's wall time is measured, and the guest's pause during the create:
#   - strata: `strata vm snapshot info` pause_ms, taken from QEMU's STOP and RESUME
#     event timestamps (a disk-only snapshot does not stop the guest: there it is
#     the time of the QMP transaction that switches the disks);
#   - libvirt: `virsh qemu-monitor-event --loop` runs during the create and prints
#     every QEMU event with QEMU's own timestamp; the pause is the sum of the
#     STOP->RESUME intervals (0 when the guest was never stopped).
# Every case runs BENCH_RUNS times (strata and libvirt alternating); the table
# shows the median. Ratio = strata / libvirt (< 1: strata is faster or pauses
# less). A step that fails is shown as "failed" with its error below the table.
# Needs (nothing is installed by this script): qemu-system-x86_64 (QEMU 10) and
# qemu-img, and libvirt 11 with its client:
#   apt-get install -t bookworm-backports libvirt-daemon-system libvirt-clients
# (or STRATA_BENCH_DEPS=1 scripts/install-deps.sh).
# Usage: scripts/bench-vm.sh   (env: LIBVIRT_URI=qemu:///system (or qemu:///session)
#        BENCH_MEMORY_MIB=1024 BENCH_RUNS=3 BENCH_ONLY="disk-only-external internal-full
#        external-full" STRATA=path WORK=dir STRATA_TEST_GUEST=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${WORK:-$PWD/bench-work/vm}")
URI=${LIBVIRT_URI:-qemu:///system}
MEM=${BENCH_MEMORY_MIB:-1024}
KINDS=${BENCH_ONLY:-disk-only-external internal-full external-full}
RUNS=${BENCH_RUNS:-3}
GUEST=$(realpath -m "${STRATA_TEST_GUEST:-$PWD/target/test-guest}")
DOM=strata-bench
APPEND="console=ttyS0 panic=-1 quiet"

die() { echo "bench-vm: $*" >&2; exit 1; }
for t in qemu-system-x86_64 qemu-img python3; do
  command -v "$t" >/dev/null || die "$t is required (scripts/install-deps.sh)"
done
command -v virsh >/dev/null || die "virsh is required: apt-get install -t bookworm-backports libvirt-daemon-system libvirt-clients (or STRATA_BENCH_DEPS=1 scripts/install-deps.sh)"
for f in vmlinuz initrd.img data.qcow2; do
  [ -f "$GUEST/$f" ] || die "no test guest in $GUEST: run scripts/build-test-guest.sh $GUEST"
done
STRATA=${STRATA:-}
if [ -z "$STRATA" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -q -p strata-cli
  STRATA=${CARGO_TARGET_DIR:-target}/release/strata
fi
STRATA=$(realpath "$STRATA")
VIRSH=(virsh -q -c "$URI")
"${VIRSH[@]}" version >/dev/null || die "libvirt does not answer at $URI: start it (systemctl start libvirtd, or libvirtd -d and virtlogd -d without systemd)"

rm -rf "$WORK"
mkdir -p "$WORK"
cp "$GUEST/vmlinuz" "$GUEST/initrd.img" "$WORK/"
export STRATA_STATE_DIR=$WORK/strata-state
export STRATA_ACCEL=tcg
EVENTS_PID=
RESULTS=$WORK/results.tsv
: >"$RESULTS"

ms_now() { echo $(($(date +%s%N) / 1000000)); }
# record KIND TOOL STEP VALUE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
# timed KIND TOOL STEP CMD...: run CMD, record its wall time in ms ("failed" and
# its error kept when it fails).
timed() {
  local kind=$1 tool=$2 step=$3 t0 t1
  shift 3
  t0=$(ms_now)
  if "$@" >"$WORK/out" 2>&1; then
    t1=$(ms_now)
    record "$kind" "$tool" "$step" $((t1 - t0))
  else
    record "$kind" "$tool" "$step" failed
    echo "$tool $kind $step: $(tr '\n' ' ' <"$WORK/out")" >>"$WORK/failures"
  fi
}
wait_until() { # SECONDS WHAT CMD...: poll CMD until it succeeds
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what did not happen in ${limit}s"
    sleep 0.5
  done
}

cleanup() {
  if [ -n "$EVENTS_PID" ]; then kill "$EVENTS_PID" 2>/dev/null || true; fi
  "$STRATA" vm kill bench >/dev/null 2>&1 || true
  "${VIRSH[@]}" destroy "$DOM" >/dev/null 2>&1 || true
  "${VIRSH[@]}" undefine "$DOM" --snapshots-metadata >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ---- strata -----------------------------------------------------------------
strata_case() { # KIND
  local kind=$1 disk=$WORK/strata-$1.qcow2 snap=s
  local create=(--external)
  case $kind in
    disk-only-external) create=(--disk-only --external) ;;
    internal-full) create=(--internal) ;;
  esac
  cp "$GUEST/data.qcow2" "$disk"
  "$STRATA" vm define bench --memory "${MEM}M" --cpus 1 --disk "$disk" \
    --kernel "$WORK/vmlinuz" --initrd "$WORK/initrd.img" --append "$APPEND" >/dev/null
  "$STRATA" vm start bench >/dev/null 2>&1
  wait_until 180 "strata's guest agent answering" "$STRATA" vm exec bench -- true
  "$STRATA" vm exec bench -- sh -c 'echo before >/data/bench' >/dev/null
  timed "$kind" strata create "$STRATA" vm snapshot create bench "$snap" "${create[@]}"
  record "$kind" strata pause "$("$STRATA" vm snapshot info bench "$snap" |
    python3 -c 'import json,sys; p=json.load(sys.stdin).get("pause_ms"); print("n/a" if p is None else p)')"
  "$STRATA" vm exec bench -- sh -c 'echo after >/data/bench' >/dev/null
  timed "$kind" strata revert "$STRATA" vm snapshot revert bench "$snap" --force
  timed "$kind" strata delete "$STRATA" vm snapshot delete bench "$snap"
  "$STRATA" vm kill bench >/dev/null 2>&1 || true
  "$STRATA" vm undefine bench >/dev/null
}

# ---- libvirt ----------------------------------------------------------------
domain_xml() { # DISK
  cat <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>$MEM</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$WORK/vmlinuz</kernel>
    <initrd>$WORK/initrd.img</initrd>
    <cmdline>$APPEND</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='$WORK/libvirt-serial.log'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

agent() { "${VIRSH[@]}" qemu-agent-command "$DOM" "$1"; }
guest_write() { # TEXT: write TEXT to /data/bench through the agent, wait for it
  local pid
  pid=$(agent "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"echo $1 >/data/bench\"]}}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
  wait_until 30 "the guest's write" sh -c "${VIRSH[*]} qemu-agent-command $DOM '{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}' | grep -q '\"exited\":true'"
}

# The guest's pause: the sum of STOP->RESUME intervals in the event log, in ms.
pause_from_events() {
  python3 - "$1" <<'EOF'
import re, sys
total, stop = 0.0, None
for line in open(sys.argv[1]):
    m = re.search(r"event (STOP|RESUME) at (\d+\.\d+)", line)
    if not m:
        continue
    t = float(m.group(2))
    if m.group(1) == "STOP":
        stop = t
    elif stop is not None:
        total += t - stop
        stop = None
print(round(total * 1000))
EOF
}

libvirt_case() { # KIND
  local kind=$1 disk=$WORK/libvirt-$1.qcow2 snap=s
  local create=("$snap")
  case $kind in
    disk-only-external) create=("$snap" --disk-only --atomic) ;;
    external-full) create=("$snap" --memspec "file=$WORK/libvirt-$kind.mem,snapshot=external"
      --diskspec "vda,snapshot=external,file=$WORK/libvirt-$kind-ov.qcow2" --atomic) ;;
  esac
  cp "$GUEST/data.qcow2" "$disk"
  domain_xml "$disk" >"$WORK/domain.xml"
  "${VIRSH[@]}" define "$WORK/domain.xml" >/dev/null
  "${VIRSH[@]}" start "$DOM" >/dev/null
  wait_until 180 "libvirt's guest agent answering" agent '{"execute":"guest-ping"}'
  guest_write before
  "${VIRSH[@]}" qemu-monitor-event "$DOM" --loop >"$WORK/events-$kind" 2>&1 &
  EVENTS_PID=$!
  sleep 1
  timed "$kind" libvirt create "${VIRSH[@]}" snapshot-create-as "$DOM" "${create[@]}"
  sleep 1
  kill "$EVENTS_PID" 2>/dev/null || true
  wait "$EVENTS_PID" 2>/dev/null || true
  EVENTS_PID=
  record "$kind" libvirt pause "$(pause_from_events "$WORK/events-$kind")"
  guest_write after
  timed "$kind" libvirt revert "${VIRSH[@]}" snapshot-revert "$DOM" "$snap" --running
  timed "$kind" libvirt delete "${VIRSH[@]}" snapshot-delete "$DOM" "$snap"
  "${VIRSH[@]}" destroy "$DOM" >/dev/null 2>&1 || true
  "${VIRSH[@]}" undefine "$DOM" --snapshots-metadata >/dev/null
}

"$STRATA" vm kill bench >/dev/null 2>&1 || true
for run in $(seq "$RUNS"); do
  for kind in $KINDS; do
    echo "bench-vm: run $run/$RUNS: $kind under strata"
    strata_case "$kind"
    echo "bench-vm: run $run/$RUNS: $kind under libvirt"
    libvirt_case "$kind"
  done
done

echo
echo "guest: ${MEM} MiB, 1 vCPU, TCG; median of $RUNS runs; libvirt $("${VIRSH[@]}" version | sed -n 's/^Running hypervisor: //p;s/^Using library: //p' | paste -sd' ')"
python3 - "$RESULTS" <<'EOF'
import statistics, sys
values = {}
for line in open(sys.argv[1]):
    kind, tool, step, value = line.rstrip("\n").split("\t")
    values.setdefault((kind, step), {}).setdefault(tool, []).append(value)
def median(vs):
    try:
        return str(round(statistics.median(float(v) for v in vs)))
    except ValueError:
        return "failed" if "failed" in vs else vs[0]
rows = {k: {t: median(vs) for t, vs in v.items()} for k, v in values.items()}
print(f"{'case':<22} {'step':<8} {'strata ms':>10} {'libvirt ms':>11} {'ratio':>7}")
for (kind, step), v in rows.items():
    s, l = v.get("strata", "-"), v.get("libvirt", "-")
    try:
        ratio = f"{float(s) / float(l):.2f}" if float(l) > 0 else "-"
    except ValueError:
        ratio = "-"
    print(f"{kind:<22} {step:<8} {s:>10} {l:>11} {ratio:>7}")
EOF
if [ -s "$WORK/failures" ]; then
  echo
  cat "$WORK/failures"
fi
