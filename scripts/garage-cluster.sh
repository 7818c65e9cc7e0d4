#!/usr/bin/env bash
# A three-node Garage cluster on loopback, three replicas of every object, and a
# strata backup that loses one node half-way and still completes; restic then
# checks every blob through each surviving node, strata restores the disk, and
# once the node is back an incremental backup goes through it. The nodes'
# configuration is scripts/garage-node.toml, as in the S3 backup tests.
#
#   bash scripts/garage-cluster.sh            # 256 MiB disk
#   DISK_MIB=1024 bash scripts/garage-cluster.sh
#
# Needs garage (scripts/install-deps.sh builds it), restic and a built strata.
set -euo pipefail
cd "$(dirname "$0")/.."
STRATA=${STRATA:-$PWD/target/release/strata}
GARAGE=${GARAGE:-$(command -v garage || echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage")}
DISK_MIB=${DISK_MIB:-256}
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
s3_ports=()
for i in 0 1 2; do
  root=$work/node$i; mkdir -p "$root"
  rpc=$(free_port); s3=$(free_port); s3_ports+=("$s3")
  sed -e "s|@ROOT@|$root|g" -e "s|@REPLICAS@|3|" -e "s|@RPC_PORT@|$rpc|g" \
    -e "s|@S3_PORT@|$s3|" -e "s|@RPC_SECRET@|$secret|" scripts/garage-node.toml >"$root/garage.toml"
  "$GARAGE" -c "$root/garage.toml" server >>"$root/log" 2>&1 &
  pids+=($!)
done
g() { "$GARAGE" -c "$work/node0/garage.toml" "$@"; }
node_id() {
  for _ in $(seq 100); do
    id=$("$GARAGE" -c "$work/node$1/garage.toml" node id -q 2>/dev/null) && { echo "$id"; return; }
    sleep 0.2
  done
  echo "node $1 did not start: $(cat "$work/node$1/log")" >&2; exit 1
}

say "forming the cluster: 3 nodes, replication factor 3"
ids=("$(node_id 0)" "$(node_id 1)" "$(node_id 2)")
g node connect "${ids[1]}" >/dev/null
g node connect "${ids[2]}" >/dev/null
for id in "${ids[@]}"; do g layout assign -z dc1 -c 1G "${id%%@*}" >/dev/null; done
g layout apply --version 1 >/dev/null
g bucket create strata >/dev/null
key=$(g key create demo)
export AWS_ACCESS_KEY_ID=$(sed -n 's/^ *Key ID: *//p' <<<"$key")
export AWS_SECRET_ACCESS_KEY=$(sed -n 's/^ *Secret key: *//p' <<<"$key")
export AWS_DEFAULT_REGION=garage
g bucket allow --read --write --owner strata --key demo >/dev/null
g status

export STRATA_PASSWORD=demo RESTIC_PASSWORD=demo
repo="s3:http://127.0.0.1:${s3_ports[0]}/strata/demo"
"$STRATA" backup init --repo "$repo"
head -c $((DISK_MIB / 2 * 1048576)) /dev/urandom >"$work/disk.raw"
truncate -s "${DISK_MIB}M" "$work/disk.raw"

say "backing up a $DISK_MIB MiB disk; node 2 is killed once it holds 4 MiB of it"
"$STRATA" backup create --repo "$repo" "$work/disk.raw" &
backup=$!
while [ "$(du -sm "$work/node2/data" | cut -f1)" -lt 4 ] && kill -0 "$backup" 2>/dev/null; do
  sleep 0.05
done
kill -9 "${pids[2]}"
echo "node 2 killed (backup still running: $(kill -0 $backup 2>/dev/null && echo yes || echo no))"
wait "$backup"

for n in 0 1; do
  say "restic check --read-data through node $n"
  restic --no-cache -r "s3:http://127.0.0.1:${s3_ports[$n]}/strata/demo" check --read-data
done
say "strata restore through node 1"
"$STRATA" backup restore --repo "s3:http://127.0.0.1:${s3_ports[1]}/strata/demo" latest "$work/out.raw"
cmp "$work/disk.raw" "$work/out.raw" && echo "restored disk identical to the source"

say "node 2 back; an incremental backup through it"
"$GARAGE" -c "$work/node2/garage.toml" server >>"$work/node2/log" 2>&1 &
pids[2]=$!
# Its peers gave up on it: it calls them now rather than on its next retry.
for id in "${ids[0]}" "${ids[1]}"; do
  until "$GARAGE" -c "$work/node2/garage.toml" node connect "$id" >/dev/null 2>&1; do sleep 0.2; done
done
until "$GARAGE" -c "$work/node2/garage.toml" json-api GetClusterHealth 2>/dev/null |
  grep -q '"connectedNodes": *3'; do sleep 0.2; done
repo2="s3:http://127.0.0.1:${s3_ports[2]}/strata/demo"
printf 'changed after the node came back' | dd of="$work/disk.raw" bs=1M seek=1 conv=notrunc status=none
"$STRATA" backup create --repo "$repo2" --parent latest "$work/disk.raw"
"$STRATA" backup restore --repo "$repo2" latest "$work/out.raw"
cmp "$work/disk.raw" "$work/out.raw" && echo "the incremental restores identical to the changed disk"
