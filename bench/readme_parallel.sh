#!/usr/bin/env bash
# Runs the command lines of docs/parallel.md's Slurm and Ray sections (until the docs moved there,
# README.md's "Parallel and distributed writing"), as written there, on a tiny Mistral-shaped
# checkpoint (the demo's, `shardsurgeon demo --keep`), and checks each output with
# `shardsurgeon verify OUT --src SRC` and against a one-process run's bytes.
#
# - The Slurm array: write.sbatch and finalize.sbatch are the docs' files (with the demo source
#   in place of /shared/Meta-Llama-3.1-405B); there is no Slurm here, so each array task runs as
#   `SLURM_ARRAY_TASK_ID=K bash write.sbatch`, all N at once, then finalize.sbatch once they end.
# - Ray: a local head (`ray start --head`, two CPUs, its own session, stopped by its process group),
#   then the docs' `shardsurgeon apply plan.json OUT --ray` with RAY_ADDRESS naming it.
#
#   bash bench/readme_parallel.sh          (from the checkout; PYTHON defaults to the venv's)
set -euo pipefail
checkout=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
export PYTHONPATH=$checkout
work=$(mktemp -d /tmp/ssrp-XXXXXX)   # short: Ray's socket paths must stay under ~100 bytes
head_pid=""
cleanup() {
    if [ -n "$head_pid" ]; then kill -TERM -- "-$head_pid" 2>/dev/null || true; wait "$head_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir bin && printf '#!/bin/sh\nexec %s -m shardsurgeon "$@"\n' "$PYTHON" > bin/shardsurgeon && chmod +x bin/shardsurgeon
export PATH=$work/bin:$PATH

shardsurgeon demo --keep demo -q
SRC=$work/demo/$(ls demo | grep -v -- -expanded | head -1)
[ -f "$SRC/config.json" ] || { echo "no demo source in $work/demo: $(ls demo)"; exit 1; }
layers=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$SRC/config.json")
echo "source: $SRC ($layers layers)"

# --- the docs' commands, SRC standing for /shared/Meta-Llama-3.1-405B ---------------------------
N=4
shardsurgeon expand --src "$SRC" --every 4 --zero residual --max-shard-size 200KB --plan-json plan.json
cat > write.sbatch <<EOF
#!/bin/bash
#SBATCH --job-name=expand-write
#SBATCH --array=1-$N
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
shardsurgeon apply plan.json llama-pro -q --shards \$SLURM_ARRAY_TASK_ID/$N
EOF
cat > finalize.sbatch <<'EOF'
#!/bin/bash
#SBATCH --job-name=expand-finalize
#SBATCH --mem=2G
shardsurgeon apply plan.json llama-pro --finalize
EOF
# sbatch --parsable write.sbatch, then sbatch --dependency=afterok:$array finalize.sbatch, emulated:
pids=()
for k in $(seq 1 $N); do SLURM_ARRAY_TASK_ID=$k bash write.sbatch & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
[ ! -e llama-pro ] || { echo "FAIL: the array tasks published an output before finalize"; exit 1; }
bash finalize.sbatch
shardsurgeon verify llama-pro --src "$SRC"
echo "slurm-array: ok ($(ls llama-pro/*.safetensors | wc -l) shards by $N tasks)"

# --- one process, the reference bytes ---------------------------------------------------------------
mkdir one && (cd one && shardsurgeon apply ../plan.json llama-pro -q)
shardsurgeon apply plan.json jobs2 -q --jobs 2
for f in one/llama-pro/*.safetensors one/llama-pro/model.safetensors.index.json one/llama-pro/config.json; do
    cmp "$f" "llama-pro/$(basename "$f")"
    cmp "$f" "jobs2/$(basename "$f")"
done
echo "apply whole, --jobs 2 and the Slurm array: the same shard, index and config bytes"

# --- Ray -----------------------------------------------------------------------------------------
ray_exe=$(dirname "$PYTHON")/ray
port=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
setsid "$ray_exe" start --head --block --port="$port" --node-ip-address=127.0.0.1 --num-cpus=2 \
    --include-dashboard=false --disable-usage-stats --temp-dir="$work/ray" > ray.log 2>&1 &
head_pid=$!
for _ in $(seq 1 120); do "$ray_exe" status --address="127.0.0.1:$port" > /dev/null 2>&1 && break; sleep 1; done
export RAY_ADDRESS=127.0.0.1:$port
shardsurgeon apply plan.json llama-pro-ray --ray
shardsurgeon verify llama-pro-ray --src "$SRC"
shardsurgeon expand --src "$SRC" --every 4 --zero residual --max-shard-size 200KB --out expand-ray -q --ray "$RAY_ADDRESS"
shardsurgeon verify expand-ray --src "$SRC"
for f in one/llama-pro/*.safetensors one/llama-pro/model.safetensors.index.json one/llama-pro/config.json; do
    cmp "$f" "llama-pro-ray/$(basename "$f")"
    cmp "$f" "expand-ray/$(basename "$f")"
done
echo "ray: ok, the same bytes"
echo "ALL OK"
