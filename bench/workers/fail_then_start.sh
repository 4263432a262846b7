#!/bin/sh
# Restart-gap worker: on the first attempt local rank 0 records the time and
# fails; on the second attempt every rank records when it started.
if [ "$TORCHELASTIC_RESTART_COUNT" = "0" ]; then
  if [ "$LOCAL_RANK" = "0" ]; then
    date +%s%N > "$BENCH_OUT/fail"
    exit 1
  fi
  exec sleep 30
fi
date +%s%N > "$BENCH_OUT/start.$LOCAL_RANK"
