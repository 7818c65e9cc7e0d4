#!/usr/bin/env bash
# Build the tiny test guest the VM tests boot: DIR/vmlinuz, DIR/initrd.img, DIR/data.qcow2.
#
#   bash scripts/build-test-guest.sh DIR
#
# Made from Debian packages, without a chroot: Debian's cloud kernel (boots fast under
# TCG), busybox-static and QEMU 10's guest agent from bookworm-backports with the shared
# libraries ldd lists for it, packed into an initramfs. Its init loads the virtio modules,
# links /dev/virtio-ports/org.qemu.guest_agent.0 itself (there is no udev), mounts the
# ext4 data disk (the first virtio disk, /dev/vda) at /data, keeps the agent running and
# powers off on the ACPI power button.
#
# Cached: when DIR holds all three files and a stamp of this script and the package
# versions it would use, nothing is done. Needs apt-get, dpkg-deb, depmod (kmod),
# mkfs.ext4 (e2fsprogs) and qemu-img: scripts/install-deps.sh installs them. The
# files in DIR are never written after the build: boot copies or overlays of data.qcow2.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "build-test-guest: $*" >&2; }
die() { echo "build-test-guest: ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: $0 DIR"
DIR=$1
SCRIPT=$(readlink -f "$0")
DATA_SIZE=${STRATA_TEST_GUEST_DATA_SIZE:-64M}

for tool in apt-get apt-cache dpkg-deb depmod mkfs.ext4 qemu-img ldd flock gzip sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (run scripts/install-deps.sh)"
done

# The version apt would install: PKG's candidate, or for PKG/RELEASE that release's.
candidate() {
  local spec=$1
  case $spec in
    */*) apt-cache show "$spec" 2>/dev/null | sed -n 's/^Version: //p' | head -n1 || true ;;
    *) apt-cache policy "$spec" 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -vx '(none)' | head -n1 || true ;;
  esac
}

kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1 || true)
[ -n "$kernel_pkg" ] || die "apt-cache knows no linux-image-*-cloud-amd64 (run apt-get update)"
kernel_ver=$(candidate "$kernel_pkg")
busybox_ver=$(candidate busybox-static)
agent_ver=$(candidate qemu-guest-agent/bookworm-backports)
[ -n "$kernel_ver" ] || die "no candidate version of $kernel_pkg"
[ -n "$busybox_ver" ] || die "no candidate version of busybox-static"
[ -n "$agent_ver" ] || die "bookworm-backports has no qemu-guest-agent (run scripts/install-deps.sh)"
case $agent_ver in
  1:[1-9][0-9].*) ;;
  *) die "the guest agent must be QEMU 10 or newer; bookworm-backports offers $agent_ver" ;;
esac

stamp="script=$(sha256sum <"$SCRIPT" | cut -d' ' -f1)
$kernel_pkg=$kernel_ver
busybox-static=$busybox_ver
qemu-guest-agent=$agent_ver
data-size=$DATA_SIZE"

mkdir -p "$DIR"
DIR=$(readlink -f "$DIR")
# One builder per DIR at a time: parallel test binaries may all ask for the guest.
exec 9>"$DIR/.lock"
flock 9

is_current() {
  [ -f "$DIR/vmlinuz" ] && [ -f "$DIR/initrd.img" ] && [ -f "$DIR/data.qcow2" ] &&
    [ -f "$DIR/stamp" ] && [ "$(cat "$DIR/stamp")" = "$stamp" ]
}
if is_current; then
  say "$DIR is up to date"
  exit 0
fi

work=$(mktemp -d "$DIR/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt's download sandbox user must be able to write where it downloads.
mkdir "$work/debs"
chmod 0777 "$work/debs"
say "downloading $kernel_pkg $kernel_ver, busybox-static $busybox_ver, qemu-guest-agent $agent_ver"
(cd "$work/debs" && apt-get download -q \
  "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" "qemu-guest-agent=$agent_ver") >&2

for d in kernel busybox agent; do mkdir "$work/$d"; done
dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/debs/busybox-static_*.deb "$work/busybox"
dpkg-deb -x "$work"/debs/qemu-guest-agent_*.deb "$work/agent"

kver=${kernel_pkg#linux-image-}
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,data,var,lib64}
ln -s ../run "$root/var/run"

# busybox and its applets.
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done

# The agent and the shared libraries it loads (the host's, which match the
# backports agent install-deps.sh puts on the host).
cp "$work/agent/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
libs=$(ldd "$root/usr/sbin/qemu-ga" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}')
[ -n "$libs" ] || die "ldd listed no libraries for qemu-ga"
if ldd "$root/usr/sbin/qemu-ga" | grep -q 'not found'; then
  die "qemu-ga needs libraries the host lacks: $(ldd "$root/usr/sbin/qemu-ga" | grep 'not found' | tr -s ' \n' ' ')"
fi
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# The modules the init loads, their dependency tables made by depmod for this tree.
moddir=lib/modules/$kver
mkdir -p "$root/$moddir"
cp "$work/kernel/$moddir"/modules.{order,builtin,builtin.modinfo} "$root/$moddir/"
for m in virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev \
  virtio_blk virtio_console crc32c-intel button evdev; do
  src=$(find "$work/kernel/$moddir/kernel" -name "$m.ko*" | head -n1)
  [ -n "$src" ] || die "$kernel_pkg has no module $m"
  rel=${src#"$work/kernel/"}
  mkdir -p "$root/$(dirname "$rel")"
  cp "$src" "$root/$rel"
done
depmod -b "$root" "$kver"
[ -s "$root/$moddir/modules.dep" ] || die "depmod wrote no modules.dep"

cat >"$root/init" <<'INIT'
#!/bin/sh
# strata test guest: set up devices and /data, then hand over to busybox init.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
for m in virtio_pci virtio_blk virtio_console button evdev; do
  modprobe "$m" || echo "init: could not load $m"
done
# ext4 uses the generic crc32c when the CPU has no SSE4.2.
modprobe crc32c-intel 2>/dev/null
# Wait (up to 5 s) for the virtio devices to appear.
i=0
while [ $i -lt 50 ] && { ! ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 || [ ! -b /dev/vda ]; }; do
  sleep 0.1
  i=$((i + 1))
done
# No udev: name the virtio serial ports as udev would.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -f "$p/name" ] || continue
  name=$(cat "$p/name")
  [ -n "$name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$name"
done
if [ -b /dev/vda ]; then
  mount -t ext4 /dev/vda /data || echo "init: could not mount /dev/vda on /data"
else
  echo "init: no /dev/vda; /data is not a disk"
fi
echo "init: strata test guest up"
exec /bin/init
INIT
chmod 0755 "$root/init"

cat >"$root/etc/inittab" <<'TAB'
::respawn:/bin/sh -c 'qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run; sleep 1'
::respawn:/bin/acpid -f -l /run/acpid.log
::shutdown:/bin/sync
::shutdown:/bin/umount -r /data
TAB
cat >"$root/etc/acpi/PWRF/00000080" <<'PWR'
#!/bin/sh
poweroff
PWR
chmod 0755 "$root/etc/acpi/PWRF/00000080"

say "packing the initramfs"
(cd "$root" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

say "making the ext4 data disk ($DATA_SIZE)"
mkdir "$work/data"
echo "strata test guest data disk" >"$work/data/README"
mkfs.ext4 -q -F -L strata-data -d "$work/data" "$work/data.raw" "$DATA_SIZE" >&2
qemu-img convert -q -f raw -O qcow2 "$work/data.raw" "$work/data.qcow2"

# Publish: the stamp goes last, so an interrupted build is redone.
rm -f "$DIR/stamp"
for f in vmlinuz initrd.img data.qcow2; do
  mv -f "$work/$f" "$DIR/$f"
done
printf '%s\n' "$stamp" >"$DIR/stamp.tmp"
mv -f "$DIR/stamp.tmp" "$DIR/stamp"
say "built $DIR (vmlinuz, initrd.img, data.qcow2)"
