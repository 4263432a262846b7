#!/bin/sh
# Rendezvous-benchmark worker: records when it started, with its rank.
date +%s%N > "$BENCH_OUT/$RANK"
