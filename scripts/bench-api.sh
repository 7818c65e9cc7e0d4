#!/usr/bin/env bash
# Benchmark the image API of `strata serve` on loopback:
#   - throughput: a random file (1 GiB) copied with `cp` + `sync` (the floor),
#     uploaded with `curl -T` (the server syncs before it answers) and
#     downloaded with `curl -o` + `sync`; ratio = floor time / API time
#     (target >= 0.8); the download is compared with `cmp`;
#   - the hash floor, measured in the same run on the same file: an upload
#     must compute MD5 and SHA-512 of every byte (python's hashlib, that is
#     OpenSSL's assembly, in two processes at once, one per core), a download
#     must verify SHA-512 (one process); hash/API is the share of that floor
#     the API reaches (1.00: the API costs nothing beyond its hashing);
#   - listing: 10 000 images created 16 at a time, then `GET /v2/images?limit=25`
#     timed for the first page, a page after a middle marker, and the first
#     page sorted by name (median of BENCH_RUNS curl requests; target < 50 ms).
# Usage: scripts/bench-api.sh   (env: BENCH_SIZE_MB=1024 BENCH_IMAGES=10000
#        BENCH_RUNS=11 STRATA=path WORK=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${BENCH_SIZE_MB:-1024}
IMAGES=${BENCH_IMAGES:-10000}
RUNS=${BENCH_RUNS:-11}
WORK=${WORK:-$PWD/bench-work/api}
STRATA=${STRATA:-}
if [ -z "$STRATA" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -q -p strata-cli
  STRATA=${CARGO_TARGET_DIR:-target}/release/strata
fi
for t in curl python3 cmp; do
  command -v "$t" >/dev/null || { echo "bench-api: $t is required" >&2; exit 1; }
done
rm -rf "$WORK"
mkdir -p "$WORK"
PID=
cleanup() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }

SRC=$WORK/src.raw
echo "bench-api: writing a ${SIZE_MB} MiB random file"
head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"
sync

# The floor: a plain copy, synced.
t0=$(now); cp "$SRC" "$WORK/copy.raw"; sync; t1=$(now)
FLOOR=$(secs "$t0" "$t1")
rm -f "$WORK/copy.raw"

# The hash floor: the digests the API must compute, and nothing else.
hash_secs() { # wall time of hashing $SRC with each algorithm named, at once
  python3 - "$SRC" "$@" <<'PY'
import hashlib, multiprocessing, sys, time
def digest(args):
    path, algo = args
    h, buf = hashlib.new(algo), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
path, algos = sys.argv[1], sys.argv[2:]
with multiprocessing.Pool(len(algos)) as pool:
    t0 = time.monotonic()
    pool.map(digest, [(path, a) for a in algos], chunksize=1)
    print(f"{time.monotonic() - t0:.2f}")
PY
}
HASH_UP=$(hash_secs md5 sha512)
HASH_DOWN=$(hash_secs sha512)

STATE=$WORK/state
TOKEN=$("$STRATA" token create --state-dir "$STATE")
: >"$WORK/serve.out"
"$STRATA" serve --listen 127.0.0.1:0 --state-dir "$STATE" >"$WORK/serve.out" 2>"$WORK/serve.err" &
PID=$!
URL=
for _ in $(seq 200); do
  URL=$(sed -n 's/^strata serve: listening on //p' "$WORK/serve.out")
  [ -n "$URL" ] && break
  sleep 0.05
done
[ -n "$URL" ] || { echo "bench-api: strata serve did not start: $(cat "$WORK/serve.err")" >&2; exit 1; }
H=(-H "X-Auth-Token: $TOKEN")

ID=$(curl -sf "${H[@]}" -H 'Content-Type: application/json' \
  -d '{"name": "bench", "disk_format": "raw", "container_format": "bare"}' "$URL/v2/images" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
t0=$(now)
curl -sf "${H[@]}" -H 'Expect:' -H 'Content-Type: application/octet-stream' -T "$SRC" "$URL/v2/images/$ID/file"
t1=$(now)
UP=$(secs "$t0" "$t1")
t0=$(now)
curl -sf "${H[@]}" -o "$WORK/down.raw" "$URL/v2/images/$ID/file"
sync
t1=$(now)
DOWN=$(secs "$t0" "$t1")
cmp "$SRC" "$WORK/down.raw" || { echo "bench-api: the download differs" >&2; exit 1; }
rm -f "$SRC" "$WORK/down.raw"
curl -sf "${H[@]}" -X DELETE "$URL/v2/images/$ID"

row() { printf '%-18s %10s %8s %24s %7s %9s\n' "$@"; }
row "case (${SIZE_MB} MiB)" "cp+sync s" "API s" "hash floor s" "cp/API" "hash/API"
row upload "$FLOOR" "$UP" "$HASH_UP (md5 || sha512)" "$(ratio "$FLOOR" "$UP")" "$(ratio "$HASH_UP" "$UP")"
row download "$FLOOR" "$DOWN" "$HASH_DOWN (sha512)" "$(ratio "$FLOOR" "$DOWN")" "$(ratio "$HASH_DOWN" "$DOWN")"
echo "bench-api: load average $(cut -d' ' -f1-3 /proc/loadavg) (ratios are only comparable when it is below 1)"

echo "bench-api: creating $IMAGES images, 16 at a time"
t0=$(now)
python3 - "$URL" "$TOKEN" "$IMAGES" <<'EOF'
import http.client, json, sys, urllib.parse
from concurrent.futures import ThreadPoolExecutor
url, token, n = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def create(i):
    c = http.client.HTTPConnection(url.hostname, url.port)
    body = json.dumps({"name": f"img-{(i * 7919) % n:05d}", "disk_format": "qcow2",
                       "container_format": "bare"})
    c.request("POST", "/v2/images", body,
              {"X-Auth-Token": token, "Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    if r.status != 201:
        sys.exit(f"bench-api: create answered {r.status}")
with ThreadPoolExecutor(16) as ex:
    list(ex.map(create, range(n)))
EOF
t1=$(now)
echo "bench-api: $IMAGES images created in $(secs "$t0" "$t1") s"

# A marker in the middle of the default order: follow `next` to half way.
MID=$(python3 - "$URL" "$TOKEN" "$IMAGES" <<'EOF'
import http.client, json, sys, urllib.parse
url, token, n = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2], int(sys.argv[3])
path, seen = "/v2/images?limit=100", []
while len(seen) < n:
    c = http.client.HTTPConnection(url.hostname, url.port)
    c.request("GET", path, headers={"X-Auth-Token": token})
    page = json.loads(c.getresponse().read())
    seen += [i["id"] for i in page["images"]]
    if "next" not in page:
        break
    path = page["next"]
print(seen[len(seen) // 2])
EOF
)

page_ms() { # median time of RUNS requests for $1, in ms
  for _ in $(seq "$RUNS"); do
    curl -sf "${H[@]}" -o /dev/null -w '%{time_total}\n' "$URL$1"
  done | sort -n | awk '{t[NR] = $1} END {printf "%.1f", t[int((NR + 1) / 2)] * 1000}'
}
printf '%-40s %8s\n' "page of 25 ($IMAGES images)" "ms"
printf '%-40s %8s\n' "first" "$(page_ms '/v2/images?limit=25')"
printf '%-40s %8s\n' "after a middle marker" "$(page_ms "/v2/images?limit=25&marker=$MID")"
printf '%-40s %8s\n' "first, sorted by name" "$(page_ms '/v2/images?limit=25&sort_key=name&sort_dir=asc')"
