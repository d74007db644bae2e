#!/usr/bin/env bash
# Send one inference request to kp-pipeline from the command line with kcat, and print
# its result.
#
#   infer.sh <bootstrap> <input topic> <model> '<inputs as a v2 JSON array>' [wait seconds]
#
# The request is the Open Inference Protocol's v2 JSON body (as KServe and Triton take it
# over HTTP) with a `content-type: application/json` header, so the pipeline reads it on
# any input topic. It names a reply topic of its own in `parameters.reply_topic`; the
# result comes back there as a v2 JSON response body (kp-pipeline's status, timings and
# source offset under `parameters`), and is printed as one line. A request the pipeline
# refuses goes to its dead-letter topic instead: this script then waits out its time and
# exits 1 (`kp-pipeline dlq inspect --id <id>` says why).
#
# KCAT names the kcat binary (default: kcat). Any kcat works against Apache Kafka;
# against the embedded Tansu broker it needs librdkafka >= 2.3 (see the README).
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
bootstrap=$1 topic=$2 model=$3 inputs=$4 wait=${5:-30}
kcat=${KCAT:-kcat}
id="kcat-$$-$(date +%s%N)"
reply="kp.replies.kcat.$$.$(date +%s%N)"

printf '{"id":"%s","model_name":"%s","parameters":{"reply_topic":"%s"},"inputs":%s}\n' \
  "$id" "$model" "$reply" "$inputs" |
  "$kcat" -q -b "$bootstrap" -P -t "$topic" -k "$id" -H content-type=application/json

# The reply topic is this request's alone: its first record is the answer. It exists
# once the pipeline has answered, so until then kcat's "Unknown topic" is retried.
deadline=$((SECONDS + wait))
while [ "$SECONDS" -lt "$deadline" ]; do
  if timeout $((deadline - SECONDS)) "$kcat" -q -b "$bootstrap" -C -t "$reply" -o beginning -c 1 \
    -f '%s\n' 2>/dev/null; then
    exit 0
  fi
  sleep 0.2
done
echo "no result for $id on $reply within ${wait}s (see: kp-pipeline dlq inspect --id $id)" >&2
exit 1
