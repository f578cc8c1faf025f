#!/usr/bin/env bash
# One device call that validates and measures everything GPU-side (run from the repo root on the GPU
# machine; results land in $OUT). Ordered by importance, each step time-boxed, so a cut-short call
# still returns the first answers.
# The device's copy of the tree carries a stale .git: write the commit into the command literally, as
# VELOTUNE_COMMIT=<sha from `git rev-parse --short HEAD` run HERE> (+dirty for uncommitted changes). A
# `$(git rev-parse ...)` in the command runs on the device and records that stale .git's commit (12th session).
#   OUT=/tmp/out bash bench/gpu_session.sh [tests|new|attention|dequant|wfsteps|nanfilter|train1b|train8b|memory|poolmem|poolsize|packing|workflow|decode|all|long|probe|ddp|fsdp70b|gguf]...
# (several stages run in the order given; PROFILE=1: train1b / train8b also write each velotune peer's
# per-op profile of one step to $OUT/profiles)
set -u
OUT=${OUT:-/tmp/velotune-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
for what in "${@:-all}"; do
if [[ $what == tests || $what == all ]]; then
  # the GPU tests, new ones first: graphs, offload, generation, Gemma-2, then the rest
  timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_forward_gpu.py 2>&1 | tail -15 | tee "$OUT/tests-ff.txt"
  timeout 240 python -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/test_fast_forward_gpu.py 2>&1 | tail -8 | tee "$OUT/tests-rest.txt"
fi
if [[ $what == new ]]; then  # the GPU paths written without a GPU (2026-11-28, 4th-6th sessions): their tests first
  timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_forward_gpu.py \
    -k "padding_free_rows or warm_up_memory or bitwise_bitsandbytes or recorded_decode or long_context_paths or capture_after_eager or gpu_compiled or host_memory_model or held_4bit or bnb_gemv or offloads_the_rest" tests/kernels/test_nf4_matmul.py tests/test_optim.py 2>&1 | tail -15 | tee "$OUT/tests-new.txt"
fi
if [[ $what == train1b || $what == all ]]; then
  timeout ${LIMIT:-420} python bench/run_train_step.py --shapes 1b --peers ${PEERS:-velotune velotune_lossapart velotune_poolfit velotune_noskip velotune_expandable velotune_auto unsloth hf liger} \
    --results "$OUT/train_step.jsonl" --workdir /tmp/vb --timeout 150 ${PROFILE:+--profile-dir "$OUT/profiles"} 2>&1 | grep --line-buffered "\[bench\]\|graphs" | tee "$OUT/train1b.txt"
fi
if [[ $what == train8b || $what == all ]]; then
  timeout ${LIMIT:-560} python bench/run_train_step.py --shapes 8b --peers ${PEERS:-velotune velotune_noskip velotune_expandable velotune_auto velotune_auto_equal unsloth hf liger} \
    --results "$OUT/train_step.jsonl" --workdir /tmp/vb --timeout 200 ${PROFILE:+--profile-dir "$OUT/profiles"} 2>&1 | grep --line-buffered "\[bench\]\|graphs" | tee "$OUT/train8b.txt"
fi
if [[ $what == attention ]]; then  # SDPA backends (flash / cuDNN / efficient) at the 8B attention shape, and their bf16 error
  timeout 200 python bench/kernels/attention.py --head-dims ${HEAD_DIMS:-128 64} --lengths ${LENGTHS:-2048 16384 65536 131072} --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/attention.txt"
fi
if [[ $what == dequant ]]; then  # the NF4 dequantisation kernel's launch settings at the 8B shapes, vs bitsandbytes
  timeout 240 python bench/kernels/nf4_dequant_sweep.py --out "$OUT/kernels.jsonl" 2>&1 | tee "$OUT/dequant.txt"
fi
if [[ $what == memory ]]; then  # where the seed step's GPU memory goes (1B and 8B, velotune and Unsloth): segments, callers
  python -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from run_train_step import make_checkpoint
for s in '${MEM_SHAPES:-1b 8b}'.split(): make_checkpoint(s, Path('/tmp/vb/llama-' + s))"
  for shape in ${MEM_SHAPES:-1b 8b}; do for peer in ${MEM_PEERS:-velotune unsloth}; do
    timeout 150 python bench/train_step.py --peer $peer --ckpt /tmp/vb/llama-$shape --warmup 3 --steps 3 --json /tmp/vb/mem.json \
      --memory-trace "$OUT/memory-$shape-$peer.txt" > /dev/null 2>&1; head -3 "$OUT/memory-$shape-$peer.txt"; grep -A60 '^default-pool segments' "$OUT/memory-$shape-$peer.txt" | head -60
  done; done
fi
if [[ $what == poolmem ]]; then  # the SFT workflow's CUDA-graph pool: one line per capture (captures-*.txt), 8 vs 4 bucket lengths
  for b in ${BUCKETS:-8 4}; do
    timeout 200 python bench/packing.py --shape 1b --examples ${EXAMPLES:-128} --modes padded padfree --buckets $b --timeout 90 \
      --memory-trace "$OUT" --results "$OUT/packing-mem.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[packing\]" | tee -a "$OUT/poolmem.txt"
  done
fi
if [[ $what == poolsize ]]; then  # velotune vs a control, same run: CONTROL=--no-pool-sizing (RESERVE_POOL off,
  # the default) or --loss-apart (the loss's temporaries outside the graphs' pool: LOSS_IN_POOL off)
  for sz in "" ${CONTROL:---no-pool-sizing}; do
    timeout 280 python bench/packing.py --shape 1b --examples ${EXAMPLES:-256} --modes ${MODES:-padded padfree packed} $sz \
      --timeout 120 --results "$OUT/packing.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[packing\]" | tee -a "$OUT/poolsize.txt"
  done
fi
if [[ $what == packing || $what == all ]]; then
  timeout 420 python bench/packing.py --shape 1b --results "$OUT/packing.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[packing\]" | tee "$OUT/packing.txt"
fi
if [[ $what == wfsteps ]]; then  # the workflow's steps one by one: captures, syncs, GPU busy vs wall (profiled steps)
  for ls in ${LOGGING:-1 100000}; do
    timeout 280 python bench/packing.py --shape ${SHAPE:-1b} --examples ${EXAMPLES:-256} --logging-steps $ls \
      --modes ${MODES:-packed padded} --profile-steps ${PSTEPS:-30 36} --profile-out "$OUT/wfprof-log$ls" --timeout 130 \
      --results "$OUT/packing.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[packing\]" | tee -a "$OUT/wfsteps.txt"
  done
fi
if [[ $what == nanfilter ]]; then  # the workflow with the NaN filter on the GPU vs transformers' host check, one call
  for ctl in "" --host-nan-check; do
    timeout 250 python bench/packing.py --shape ${SHAPE:-1b} --examples ${EXAMPLES:-256} --logging-steps 1 \
      --modes ${MODES:-padded packed} $ctl --timeout 120 --results "$OUT/packing.jsonl" --workdir /tmp/vb 2>&1 \
      | grep --line-buffered "\[packing\]" | tee -a "$OUT/nanfilter.txt"
  done
fi
if [[ $what == workflow ]]; then  # the seed's SFTTrainer workflow on each stack (loss logged every step), padded and packed
  timeout 560 python bench/packing.py --shape ${SHAPE:-1b} --examples ${EXAMPLES:-512} --logging-steps 1 \
    --modes padded padfree unsloth_padded hf_padded packed unsloth_packed --timeout 150 --results "$OUT/packing.jsonl" \
    --workdir /tmp/vb 2>&1 | grep --line-buffered "\[packing\]" | tee "$OUT/workflow.txt"
fi
if [[ $what == long ]]; then  # not in "all": a 400K-token step is minutes; one call per length set
  # the child's limit under the call's: a child that wrote its row but is slow to exit is stopped, its row kept
  timeout 590 python bench/long_context.py --prequantized --peers ${PEERS:-velotune} --lengths ${LENGTHS:-131072 262144} \
    --timeout ${CHILD_LIMIT:-540} --results "$OUT/long_context.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[long\]" | tee "$OUT/long.txt"
fi
if [[ $what == probe ]]; then  # long context, 2 of the 8B layers: working memory and time per layer
  timeout 300 python bench/long_context.py --layers 2 --peers ${PEERS:-velotune unsloth} \
    --lengths ${LENGTHS:-131072 262144 409600 524288} --timeout 150 --results "$OUT/long_context.jsonl" --workdir /tmp/vb 2>&1 \
    | grep --line-buffered "\[long\]" | tee "$OUT/probe.txt"
fi
if [[ $what == ddp ]]; then  # a multi-GPU machine (kind nvidia-h100-x2): 1 vs GPUS ranks, DDP then FSDP2
  timeout 260 python bench/ddp_scaling.py --shape 8b --gpus ${GPUS:-2} --timeout 120 --results "$OUT/ddp_scaling.jsonl" \
    --workdir /tmp/vb 2>&1 | grep --line-buffered "\[ddp\]\|CUDA graphs" | tee "$OUT/ddp.txt"
  timeout 200 python bench/ddp_scaling.py --shape 8b --gpus ${GPUS:-2} --mode fsdp --timeout 95 --warmup 2 --steps 6 \
    --results "$OUT/ddp_scaling.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[ddp\]" | tee -a "$OUT/ddp.txt"
fi
if [[ $what == fsdp70b ]]; then  # issue #8: Llama-70B shape (SHAPE=123b: Mistral-Large), FSDP2 QLoRA on 2 ranks capped at 79 GiB
  timeout 560 python bench/ddp_scaling.py --shape ${SHAPE:-70b} --mode fsdp --gpus ${GPUS:-2} --worlds ${WORLDS:-2} --cap-gib ${CAP:-79} --host-load \
    --warmup 2 --steps 4 --timeout 420 --results "$OUT/ddp_scaling.jsonl" --workdir /tmp/vb 2>&1 | grep --line-buffered "\[ddp\]\|velotune\|Error" | tee "$OUT/fsdp70b.txt"
fi
if [[ $what == gguf ]]; then  # issue #5: q4_k_m of an 8B-shape model end to end (target <= 2 min on the GPU)
  timeout 200 python bench/gguf_quant.py --devices cuda --export-8b /tmp/vb/gguf8b --append "$OUT/gguf_quant.jsonl" 2>&1 \
    | tail -5 | tee "$OUT/gguf.txt"
  # end to end as the user does it: the 8B-shape checkpoint in 4 bits + an r16 adapter -> save_pretrained_gguf
  python -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from run_train_step import make_checkpoint
make_checkpoint('8b', Path('/tmp/vb/llama-8b'))"
  timeout 300 python bench/gguf_quant.py --types --export-model /tmp/vb/llama-8b --tokenizer .gpu-fixtures/smollm2-arch \
    --export-8b /tmp/vb/gguf8b --append "$OUT/gguf_quant.jsonl" 2>&1 | tail -3 | tee -a "$OUT/gguf.txt"
fi
if [[ $what == decode || $what == all ]]; then
  timeout 420 python bench/decode.py --shapes 8b --peers ${PEERS:-velotune_bnbgemv velotune_graphs velotune_gemv velotune hf unsloth hf_static} --new ${NEW:-256} --results "$OUT/decode.jsonl" \
    --workdir /tmp/vb 2>&1 | grep --line-buffered "\[decode\]" | tee "$OUT/decode.txt"
fi
done
