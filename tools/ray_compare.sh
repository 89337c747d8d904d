#!/usr/bin/env bash
# Ray Serve (1 and 2 replicas) vs the single-process server, the same 16-client load, one after the other, alone.
set -u
cd /work/main && . .venv/bin/activate
OUT=benchmarks/ray
wait_up() { for i in $(seq 1 240); do curl -sf "http://127.0.0.1:$1/sdapi/v1/options" >/dev/null && return 0; sleep 1; done; return 1; }
run() {  # name port serve-args...
  name=$1; port=$2; shift 2
  diffspeed serve --port "$port" --outputs-dir /tmp/raycmp-out "$@" > /tmp/raycmp-$name.log 2>&1 &
  pid=$!
  wait_up "$port" || { echo "$name did not start"; cat /tmp/raycmp-$name.log | tail; kill $pid; return 1; }
  python tools/load_test.py --url "http://127.0.0.1:$port" --requests 100 --clients 16 --steps 12 --no-verify-alone \
      --out "$OUT/$name.json" | tail -4
  kill -TERM $pid; wait $pid; echo "$name server exit $?"
}
run single 7881
OMP_NUM_THREADS=1 run single-1-thread 7884  # a Ray replica with num_cpus=1 runs torch with 1 thread: the same here
run ray-1-replica 7883 --ray --replicas 1
run ray-2-replicas 7882 --ray --replicas 2
ray stop --force >/dev/null 2>&1 || true
