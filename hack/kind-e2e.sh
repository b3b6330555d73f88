#!/usr/bin/env bash
# End-to-end test on kind, for users with Docker (it cannot run on the project's CI machines, which have no
# Docker engine; there `make demo` and `make test` use the local cluster instead, and CI runs shellcheck on
# this file). Needs docker, kind, kubectl, helm and curl on PATH.
#
#   bash hack/kind-e2e.sh          # KEEP_CLUSTER=1 keeps the kind cluster afterwards
#
# Steps: create a kind cluster, advertise fake huawei.com/Ascend910 capacity on its node, build the three
# images and `kind load` them, generate the tiny model into the node, `helm install` the chart (webhook in
# service mode, as on real clusters), apply examples/local/serving.yaml with a CPU engine and smoke-test the
# OpenAI API through the gateway Service.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-pypto-e2e}"
TAG="${TAG:-e2e}"
NAMESPACE=demo
START=$(date +%s)
WORK=$(mktemp -d)
PF_PID=""

log() { echo "==> [kind-e2e +$(($(date +%s) - START))s] $*"; }
cleanup() {
    local rc=$?
    [[ -n "$PF_PID" ]] && kill "$PF_PID" 2>/dev/null
    if [[ $rc != 0 ]]; then
        echo "kind-e2e: FAILED (exit $rc). State of the cluster:" >&2
        kubectl get pods -A -o wide >&2 || true
        kubectl -n "$NAMESPACE" describe pps demo >&2 || true
        echo "kind-e2e: next: read the output above; KEEP_CLUSTER=1 keeps the cluster to debug it" >&2
    fi
    if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in docker kind kubectl helm curl; do
    command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is not on PATH" >&2; exit 1; }
done

log "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null
NODE=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')

log "advertise 8 fake huawei.com/Ascend910 on $NODE (extended resource, no device plugin)"
kubectl patch node "$NODE" --subresource=status --type=json \
    -p '[{"op": "add", "path": "/status/capacity/huawei.com~1Ascend910", "value": "8"}]'

log "build the images (engine with CPU torch, operator, gateway)"
docker build --target engine -t "pypto-serving:$TAG" .
docker build --target operator -t "pypto-serving-operator:$TAG" .
docker build --target gateway -t "pypto-serving-gateway:$TAG" .
kind load docker-image --name "$CLUSTER" "pypto-serving:$TAG" "pypto-serving-operator:$TAG" \
    "pypto-serving-gateway:$TAG"

log "tiny model into the node at /models/tiny-qwen3"
docker run --rm --user "$(id -u):$(id -g)" -v "$WORK:/out" --entrypoint pypto-serving "pypto-serving:$TAG" \
    tiny-model /out/tiny-qwen3 --arch qwen3
docker exec "$NODE" mkdir -p /models
docker cp "$WORK/tiny-qwen3" "$NODE:/models/"
docker exec "$NODE" chmod -R a+rX /models

log "helm install the chart (operator watching $NAMESPACE, webhook in service mode)"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install pypto-serving helm/pypto-serving -n pypto-system --create-namespace --wait --timeout 5m \
    --set image.tag="$TAG" --set image.pullPolicy=Never \
    --set operator.watch.allNamespaces=false --set "operator.watch.namespaces={$NAMESPACE}"
kubectl -n pypto-system rollout status deploy/pypto-serving-operator --timeout=180s

log "apply examples/local/serving.yaml with the CPU engine image"
sed "s#/tmp/pypto-serving/models/tiny-qwen3#/models/tiny-qwen3#" examples/local/serving.yaml >"$WORK/serving.yaml"
kubectl patch --local -f "$WORK/serving.yaml" --type merge -o yaml -p "{\"spec\": {
    \"engine\": {\"image\": \"pypto-serving:$TAG\", \"imagePullPolicy\": \"Never\"},
    \"gateway\": {\"image\": \"pypto-serving-gateway:$TAG\"}}}" | kubectl apply -n "$NAMESPACE" -f -
kubectl -n "$NAMESPACE" wait pps/demo --for=jsonpath='{.status.phase}'=Ready --timeout=600s
kubectl -n "$NAMESPACE" rollout status deploy/demo-gateway --timeout=180s
kubectl -n "$NAMESPACE" get pps,pods -o wide

log "smoke test through the gateway Service"
kubectl -n "$NAMESPACE" port-forward svc/demo-gateway 18080:8080 >/dev/null &
PF_PID=$!
for _ in $(seq 1 30); do curl -sf localhost:18080/ready >/dev/null && break; sleep 1; done
curl -sf localhost:18080/v1/completions -H 'content-type: application/json' \
    -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 8}' | grep -q '"text"'
curl -sf localhost:18080/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}' | grep -q '"content"'
curl -sf localhost:18080/replicas | grep -o '"name": *"demo-dp-[0-9]*"' | sort
log "kind e2e passed"
