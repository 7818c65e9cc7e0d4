#!/usr/bin/env bash
# A real tour of strata img, with QEMU confirming every result, then a VM
# booted, snapshotted with its memory, changed and reverted.
set -euo pipefail
cd "$(dirname "$0")/.."
STRATA=${STRATA:-target/release/strata}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { echo "+ $*"; "$@"; }

echo "== a 256 MiB raw disk with data, zeroes and text"
python3 - "$work/disk.raw" <<'PY' 2>/dev/null || head -c 268435456 /dev/urandom > "$work/disk.raw"
import os, sys
with open(sys.argv[1], "wb") as f:
    for i in range(256):
        if i % 4 == 0:
            f.write(os.urandom(1 << 20))
        elif i % 4 == 1:
            f.write(b"\0" * (1 << 20))
        else:
            f.write(((b"strata keeps your disks %d\n" % i) * (1 << 16))[: 1 << 20])
PY

run "$STRATA" img create -f qcow2 "$work/disk.qcow2" 256M
run "$STRATA" img convert -p -n -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
run "$STRATA" img info "$work/disk.qcow2"
run "$STRATA" img map "$work/disk.qcow2" | head -8
run "$STRATA" img check "$work/disk.qcow2"
run "$STRATA" img convert -p -c -O qcow2 -o compression_type=zstd "$work/disk.qcow2" "$work/small.qcow2"
run "$STRATA" img convert -O raw "$work/small.qcow2" "$work/back.raw"
ls -ls "$work"

echo "== QEMU's verdict"
run qemu-img check "$work/disk.qcow2"
run qemu-img check "$work/small.qcow2"
run qemu-img compare "$work/disk.raw" "$work/small.qcow2"
run cmp "$work/disk.raw" "$work/back.raw"
echo "demo: all results confirmed by qemu-img"

echo "== a VM: boot the test guest, snapshot it with its memory, change a file, revert"
guest=${STRATA_TEST_GUEST:-target/test-guest}
[ -f "$guest/vmlinuz" ] || bash scripts/build-test-guest.sh "$guest"
export STRATA_STATE_DIR="$work/state"
cp "$guest/data.qcow2" "$work/vm.qcow2"
trap '"$STRATA" vm kill demo >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
run "$STRATA" vm define demo --memory 256M --cpus 1 --disk "$work/vm.qcow2" \
    --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" --append "console=ttyS0 panic=-1 quiet"
run "$STRATA" vm start demo
run "$STRATA" vm exec demo -- sh -c 'echo "written before the snapshot" > /data/note; sync'
run "$STRATA" vm snapshot create demo before-change
run "$STRATA" vm exec demo -- sh -c 'echo "written after the snapshot" > /data/note; sync'
run "$STRATA" vm snapshot revert demo before-change
run "$STRATA" vm snapshot list demo --tree
note=$("$STRATA" vm exec demo -- cat /data/note)
echo "/data/note after the revert: $note"
[ "$note" = "written before the snapshot" ] || { echo "demo: the revert did not restore the file" >&2; exit 1; }
run "$STRATA" vm kill demo
run qemu-img snapshot -l "$work/vm.qcow2"
echo "demo: the guest resumed from its snapshot with the file as it was"
