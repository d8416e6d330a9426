#!/usr/bin/env bash
# Runs the engines Tessera is compared with on the benchmark model: the
# same llama2.c file that Tessera's benchmarks synthesize (stories110M's
# shape, seed 1), on the same machine, with BENCH_THREADS threads.
#
#   LLAMA_CPP_DIR  a checkout of https://github.com/ggerganov/llama.cpp;
#                  built (CPU only) if its build/bin lacks the tools; the
#                  model is converted with llama-convert-llama2c-to-ggml and
#                  quantized with llama-quantize, then measured with
#                  llama-bench (pp512 and tg128, f32, f16 and q8_0).
#   LLAMA2C_DIR    a checkout of https://github.com/karpathy/llama2.c; run.c
#                  is built with gcc -O3 -march=native -fopenmp if needed and
#                  generates 128 tokens greedily.
#
# Nothing is fetched here. Figures go to bench/results.json (best of
# BENCH_REPS runs, as Tessera's own): decode_tok_s_llamacpp,
# prefill_tok_s_llamacpp, decode_tok_s_q8_llamacpp, prefill_tok_s_q8_llamacpp,
# decode_tok_s_f16_llamacpp, prefill_tok_s_f16_llamacpp, decode_tok_s_llama2c.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export TESSERA_BENCH_RESULTS=${TESSERA_BENCH_RESULTS:-$root/bench/results.json}
threads=${BENCH_THREADS:-2}
reps=${BENCH_REPS:-5}
out=$root/bench/out/synth110m
model=$out/synth-768x12.bin
tok=$out/tok32000.bin
benchfig() { (cd "$root" && go run ./cmd/benchfig "$@"); }

if [ ! -f "$model" ] || [ ! -f "$tok" ]; then
	(cd "$root" && go run ./cmd/tessera model synth --dim 768 --layers 12 --heads 12 --kv-heads 12 \
		--hidden 2048 --vocab 32000 --seq-len 1024 --seed 1 --out "$out")
fi

if [ -n "${LLAMA_CPP_DIR:-}" ]; then
	bin=$LLAMA_CPP_DIR/build/bin
	if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-convert-llama2c-to-ggml" ] || [ ! -x "$bin/llama-quantize" ]; then
		cmake -S "$LLAMA_CPP_DIR" -B "$LLAMA_CPP_DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
		cmake --build "$LLAMA_CPP_DIR/build" -j "$(nproc)" --target llama-bench llama-convert-llama2c-to-ggml llama-quantize
	fi
	if [ ! -f "$out/synth-f32.gguf" ]; then
		"$bin/llama-convert-llama2c-to-ggml" --copy-vocab-from-model "$tok" \
			--llama2c-model "$model" --llama2c-output-model "$out/synth-f32.gguf" >"$out/convert.log" 2>&1
	fi
	for q in f16 q8_0; do
		[ -f "$out/synth-$q.gguf" ] || "$bin/llama-quantize" "$out/synth-f32.gguf" "$out/synth-$q.gguf" "$q" >"$out/quantize-$q.log" 2>&1
	done
	for q in f32 f16 q8_0; do
		suffix=${q/f32/}
		suffix=${suffix/q8_0/_q8}
		suffix=${suffix/f16/_f16}
		"$bin/llama-bench" -m "$out/synth-$q.gguf" -t "$threads" -p 512 -n 128 -r "$reps" -o jsonl >"$out/llama-bench-$q.jsonl"
		benchfig llama-bench "prefill_tok_s${suffix}_llamacpp" "decode_tok_s${suffix}_llamacpp" <"$out/llama-bench-$q.jsonl"
	done
fi

if [ -n "${LLAMA2C_DIR:-}" ]; then
	if [ ! -x "$LLAMA2C_DIR/run" ]; then
		gcc -O3 -march=native -fopenmp -o "$LLAMA2C_DIR/run" "$LLAMA2C_DIR/run.c" -lm
	fi
	runs=()
	for i in $(seq 1 "$reps"); do
		OMP_NUM_THREADS=$threads "$LLAMA2C_DIR/run" "$model" -z "$tok" -n 128 -t 0 -i "Once upon a time" >"$out/run-c-$i.txt" 2>&1
		runs+=("$out/run-c-$i.txt")
	done
	benchfig run-c decode_tok_s_llama2c "${runs[@]}"
fi
