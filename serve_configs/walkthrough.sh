#!/usr/bin/env bash
# The fleet service on one machine, step by step: serve a line trained on real images, score an image
# over HTTP, land a new unlabeled domain, watch its adapted line appear. Run from the repository root
# after the README's first command (which trains the line; trained here if it is missing):
#
#     bash serve_configs/walkthrough.sh
#
# Everything stays on this machine: Ray and Serve on 127.0.0.1, the storage root runs/fleet.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=runs/fleet
PY=.venv/bin/python
URL=http://127.0.0.1:8000
NEW_LINE=elpv-poly-landed
json() { "$PY" -c "import json, sys; data = json.load(sys.stdin); print($1)"; }

step() { printf '\n== %s\n' "$*"; }

step "1. A line trained on real images: elpv-mono (REF+CFA on the ELPV mono cells)"
if [ ! -f "$ROOT/models/elpv-mono/CURRENT" ]; then
  "$PY" jobs/train_source.py --line elpv-mono --method ref_cfa --data elpv:mono --root "$ROOT" \
    --config configs/ref_cfa_cpu.yaml --cpus-per-worker 2
fi
echo "elpv-mono serves version $(cat "$ROOT/models/elpv-mono/CURRENT")"

step "2. Access tokens: one per line and an admin token, in a secret file (git ignores runs/)"
if ! grep -q "$NEW_LINE:" "$ROOT/tokens.yaml" 2>/dev/null; then
  "$PY" -c "import secrets; print(f'admin: {secrets.token_hex(16)}\nlines:\n  elpv-mono: {secrets.token_hex(16)}\n  elpv-poly: {secrets.token_hex(16)}\n  $NEW_LINE: {secrets.token_hex(16)}')" \
    > "$ROOT/tokens.yaml"
  chmod 600 "$ROOT/tokens.yaml"
fi
ADMIN=$(awk '/^admin:/ {print $2}' "$ROOT/tokens.yaml")
MONO=$(awk '/elpv-mono:/ {print $2}' "$ROOT/tokens.yaml")
LANDED=$(awk "/$NEW_LINE:/ {print \$2}" "$ROOT/tokens.yaml")

step "3. Start the service: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 serve run serve_configs/local.yaml (log: $ROOT/serve.log)"
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 .venv/bin/serve run serve_configs/local.yaml > "$ROOT/serve.log" 2>&1 &
SERVE_PID=$!
# (SIGTERM: a background job of a script ignores SIGINT; serve run shuts Ray down on either)
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
until curl -sf "$URL/healthz" > /dev/null; do
  kill -0 $SERVE_PID 2>/dev/null || { tail -20 "$ROOT/serve.log"; exit 1; }
  sleep 2
done
echo "up: $URL (OpenAPI page at $URL/docs)"

step "4. Score a defective mono cell of the test split (label 1) over HTTP with the line's token (and see another line refuse it)"
IMAGE=$("$PY" -c "from ray_ad.data.elpv import elpv_samples
print(next(s.path for s in elpv_samples('elpv:mono') if s.split == 'test' and s.label == 1))")
curl -s -X POST --data-binary @"$IMAGE" -H "Content-Type: image/png" -H "Authorization: Bearer $MONO" \
  "$URL/v1/lines/elpv-mono/detect"; echo
curl -s -F image=@"$IMAGE" -H "Authorization: Bearer $MONO" "$URL/v1/lines/elpv-mono/detect"; echo  # multipart
curl -s -o /dev/null -w "the same token on elpv-poly: HTTP %{http_code}\n" -X POST --data-binary @"$IMAGE" \
  -H "Content-Type: image/png" -H "Authorization: Bearer $MONO" "$URL/v1/lines/elpv-poly/detect"

step "5. A new domain lands: poly cells as the camera saw them under $ROOT/landing/$NEW_LINE/<batch>/, _READY last"
BATCH="$ROOT/landing/$NEW_LINE/batch-$(date -u +%Y%m%dt%H%M%S)"
"$PY" - "$BATCH" <<'EOF'
import shutil, sys
from pathlib import Path
from ray_ad.data.elpv import elpv_samples
batch = Path(sys.argv[1])
batch.mkdir(parents=True)
# Every poly cell except a fixed evaluation split that never lands: defective and ambiguous cells
# land too (no label chooses what lands), and only the image files travel, no label, no mask.
images = [s.path for s in elpv_samples("elpv:poly?layout=landing") if s.split == "landing"]
for path in images:
    shutil.copy(path, batch / Path(path).name)
print(f"{len(images)} images copied to {batch}")
EOF
if [ -f "$ROOT/models/$NEW_LINE/CURRENT" ]; then
  # The line serves already (an earlier run): landing into it replaces what it serves, so the marker
  # carries the admin's key for this batch.
  .venv/bin/ray-ad landing-key --line "$NEW_LINE" --batch "$(basename "$BATCH")" --source-line elpv-mono \
    --tokens "$ROOT/tokens.yaml" > "$BATCH/_READY"
else
  echo '{"source_line": "elpv-mono"}' > "$BATCH/_READY"
fi
# The watcher polls every landing_interval_s (10 s); the admin can also ask for a pass now. The
# batch's _STATE records the job it went to (the job id is derived from the batch: at most one job).
curl -s -X POST -H "Authorization: Bearer $ADMIN" "$URL/v1/landing/poll" > /dev/null
until [ -f "$BATCH/_STATE" ]; do sleep 2; done
if [ "$(json "data['state']" < "$BATCH/_STATE")" = rejected ]; then
  echo "the batch was rejected: $(json "data['error']" < "$BATCH/_STATE")"; exit 1
fi
JOB=$(json "data['job_id']" < "$BATCH/_STATE")
echo "adaptation job: $JOB"

step "6. Watch the job (GET /v1/jobs/$JOB): it builds the candidates (the source as is, a memory of the landed
   cells, REF+CFA), ranks them on held-out landed cells with small synthetic defects pasted in, and
   publishes the winner only if it beats what $NEW_LINE serves (minutes on 2 cores)"
while true; do
  STATE=$(curl -s -H "Authorization: Bearer $ADMIN" "$URL/v1/jobs/$JOB" | json "(data.get('ray') or {}).get('ray_status')")
  echo "$(date -u +%H:%M:%S) job $STATE"
  case "$STATE" in
    SUCCEEDED) break ;;
    FAILED|STOPPED) curl -s -H "Authorization: Bearer $ADMIN" "$URL/v1/jobs/$JOB"; echo; exit 1 ;;
  esac
  sleep 20
done
curl -s -H "Authorization: Bearer $ADMIN" "$URL/v1/jobs/$JOB" | json "'\\n'.join(
  [f\"  {name}: gate AUROC {c['gate_auroc']:.3f}\" for name, c in data['status']['gate']['candidates'].items()]
  + [f\"decision: {data['status']['decision']} ({data['status']['winner']})\"])"
curl -s -H "Authorization: Bearer $ADMIN" "$URL/v1/lines/$NEW_LINE" \
  | json "f\"{data['line']} now serves {data['version']} (threshold {data['threshold']:.3f})\""
POLY=$("$PY" -c "from ray_ad.data.elpv import elpv_samples
print(next(s.path for s in elpv_samples('elpv:poly?layout=landing') if s.split == 'test' and s.label == 1))")
echo "a defective poly cell (label 1) of the evaluation split (never landed), with $NEW_LINE's own token:"
curl -s -X POST --data-binary @"$POLY" -H "Content-Type: image/png" -H "Authorization: Bearer $LANDED" \
  "$URL/v1/lines/$NEW_LINE/detect"; echo
step "Done; stopping the service."
