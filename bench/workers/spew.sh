#!/bin/sh
# Tee-benchmark worker: SIZE_MB of numbered 64-byte lines on stdout, made by
# seq (C speed, so the launcher's cost is what the benchmark sees).
rank="${RANK:-${SPEW_RANK:-0}}"
lines=$(( $1 * 1048576 / 64 ))
exec seq -f "r$rank %09.0f xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" 0 $((lines - 1))
