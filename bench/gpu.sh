#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run (a lent GPU comes for minutes): real-size random weights,
# bfloat16. Logs and JSON records go to $OUT (default /tmp/vcflash-gpu); BENCHMARKS.md records them.
#   bash bench/gpu.sh                 # on the GPU box, from the repository root, with a CUDA build of torch
#   SMOKE=1 bash bench/gpu.sh         # the same scripts at tiny sizes on the CPU: checks the run before a lease
# Parts, most wanted first, each under its own time limit so one that fails or hangs leaves the others:
#   lora  - bench_train.py lora: LoRA on the 2B at 448 px, 64 and 256 frames (issue 10)
#   scan  - bench_scan.py: key index and windowed scan over 2,000 to 28,800 frames (issue 12)
#   model - bench_model.py: encoder clips/s, prefill, a whole question's peak memory (issue 2)
#   fast  - bench_model.py --kernels fast: the same encoder with SDPA in the tower
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vcflash-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

# A GPU image may lack PyAV (the only import of the model that these scripts never use: they decode no video).
if ! $PY -c "import av" 2>/dev/null; then
  stub=$(mktemp -d)
  mkdir -p "$stub/av/video"
  for m in __init__ container stream video/__init__ video/stream; do
    echo 'def __getattr__(name): return type(name, (Exception,), {})' >"$stub/av/$m.py"
  done
  export PYTHONPATH="$PYTHONPATH:$stub"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  dev=(--device cpu) size=tiny res=224 lora_frames=8 scan_frames=512 model_frames=64 batches=1,2
  compress=uniform0_attention:1,2:1,0.75,0.25
else
  dev=(--device cuda) size=2b res=448 lora_frames=64,256 scan_frames=2000,10000,28800 model_frames=512,2000
  batches=1,4,16,32 compress=uniform0_attention:4,18:1,0.75,0.25
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} | tee "$OUT/machine.txt"

part() {  # part NAME SECONDS ARGS...: one script, its log in $OUT/NAME.log, its table on stdout
  local name=$1 seconds=$2
  shift 2
  [ "${SMOKE:-0}" = 1 ] && seconds=300
  echo "== $name: $*"
  timeout "$seconds" $PY "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -E '^\|' "$OUT/$name.log" || tail -n 5 "$OUT/$name.log"
  echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
}

part lora 150 bench/bench_train.py lora --size "$size" --res "$res" --frames "$lora_frames" --steps 5 "${dev[@]}"
part scan 150 bench/bench_scan.py --size "$size" --res "$res" --frames "$scan_frames" "${dev[@]}"
part model 120 bench/bench_model.py --size "$size" --res "$res" --batches "$batches" --frames "$model_frames" \
  --compress "$compress" "${dev[@]}"
part fast 90 bench/bench_model.py --size "$size" --res "$res" --batches "$batches" --frames "${model_frames%%,*}" \
  --kernels fast "${dev[@]}"
