#!/usr/bin/env bash
# diffspeed batch on 40 prompts: in-process, Ray Data with 1 worker, Ray Data with 2 workers; one after the other.
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
P=benchmarks/ray/prompts40.jsonl
for mode in "in-process:" "ray-1-worker:--ray --workers 1" "ray-2-workers:--ray --workers 2"; do
  name=${mode%%:*}; args=${mode#*:}
  rm -rf /tmp/batchcmp-$name
  /usr/bin/time -f "$name wall %e s" diffspeed batch "$P" --out /tmp/batchcmp-$name --batch-size 8 $args --quiet 2>&1 \
      | grep -E "images|wall" | tail -2
done
ray stop --force >/dev/null 2>&1 || true
