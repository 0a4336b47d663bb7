#!/bin/bash
# The engine on a CUDA machine that has PyTorch, transformers and peft but neither this project's other
# dependencies nor the model's weights (the device machines lent to some sessions; no network there).
# Prepare here, in the repo root (both folders are git-ignored via .git/info/exclude):
#   mkdir -p .gpu/model && cp ~/.cache/loraloop/smollm2-135m-instruct/{*.json,*.jinja} .gpu/model/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl structlog peft==0.21.2 pydantic pydantic_core pydantic-settings \
#     python-dotenv annotated-types typing-inspection typing_extensions   # versions as in .venv
# then run `bash bench/cuda_check.sh` there with .gpu and .whl carried. It prints bench/engine.py's figures
# in fp32 (the correctness checks: together vs alone, vs generate) and bf16 (speed), and writes the JSON
# files to $OUT (or /tmp). Stage limits: FP32_S, BF16_S seconds; levels: FP32_BATCH, BF16_BATCH.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORALOOP_MODEL_CACHE_DIR=/tmp/cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python3 -c "import torch, transformers, peft; print('versions', torch.__version__, transformers.__version__, peft.__version__)" || exit 1
# The two ceilings, measured here: device-to-device copy (bytes read + written) and a large bf16 matmul.
python3 -c "
import time, torch
def timed(f, n):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
a = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device='cuda'); b = torch.empty_like(a)
x = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); y = torch.randn_like(x)
print(f'ceilings: copy {2 * 2**30 / timed(lambda: b.copy_(a), 20) / 1e12:.2f} TB/s, '
      f'bf16 matmul {2 * 8192**3 / timed(lambda: x @ y, 10) / 1e12:.0f} TFLOP/s')
" || exit 1
start=$(date +%s)
timeout "${FP32_S:-120}" python3 bench/engine.py --device cuda --dtype float32 --random-weights .gpu/model \
  --batch "${FP32_BATCH:-1,32}" --max-tokens 64 --out "$OUT/engine-fp32.json" 2>&1 | grep -v "Loading weights" | tail -40
echo "fp32 stage: $(($(date +%s) - start)) s"
timeout "${BF16_S:-240}" python3 bench/engine.py --device cuda --dtype bfloat16 --random-weights .gpu/model \
  --batch "${BF16_BATCH:-1,32,128,256}" --out "$OUT/engine-bf16.json" 2>&1 | grep -v "Loading weights" | tail -60
echo "total: $(($(date +%s) - start)) s"
