#!/usr/bin/env bash
# Install what strata's tests and benchmarks need on Debian bookworm:
# QEMU 10's qemu-img/qemu-io/qemu-nbd from bookworm-backports (the reference
# implementation the tests compare against) and libnbd's NBD clients.
# Idempotent; run as root (or with sudo available).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: must run as root (or with sudo)" >&2; exit 1; fi
fi

qemu_major() {
  command -v qemu-img >/dev/null 2>&1 || { echo 0; return; }
  qemu-img --version | sed -n 's/^qemu-img version \([0-9]*\)\..*/\1/p' | head -n1
}

# Debian's backports suite carries QEMU 10; plain bookworm has 7.2.
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "install-deps: adding bookworm-backports to apt sources"
  $SUDO tee /etc/apt/sources.list.d/strata-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

$SUDO apt-get update -q
$SUDO apt-get install -y -q -t bookworm-backports qemu-utils
$SUDO apt-get install -y -q libnbd-bin

major=$(qemu_major)
if [ "${major:-0}" -lt 10 ]; then
  echo "install-deps: qemu-img ${major:-missing} found, but strata's tests need QEMU 10 or newer" >&2
  exit 1
fi
echo "install-deps: $(qemu-img --version | head -n1)"
