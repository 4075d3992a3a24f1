#!/usr/bin/env bash
# The offline English corpus that `rntp prepare-data --recipe encyclopedia` reads: Debian's dictd databases of
# FOLDOC (dict-foldoc, GNU FDL 1.1+) and the Jargon File (dict-jargon, public domain), unpacked into DEST with
# `apt-get download` + `dpkg-deb -x` (nothing installed system-wide, no dict server started). Idempotent.
#   tools/install_corpus.sh [DEST]          default: data/dictd
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-data/dictd}
PACKAGES=(dict-foldoc dict-jargon)
DATABASES=(foldoc jargon)

have() {
    for db in "${DATABASES[@]}"; do
        [ -s "$1/$db.index" ] && [ -s "$1/$db.dict.dz" ] || return 1
    done
}
have "$DEST" && exit 0
mkdir -p "$DEST"
if have /usr/share/dictd; then  # the packages are installed: copy their databases
    for db in "${DATABASES[@]}"; do cp /usr/share/dictd/"$db".{index,dict.dz} "$DEST"/; done
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"
if ! (cd "$TMP" && apt-get download -qq "${PACKAGES[@]}" 2>/dev/null); then
    if [ "$(id -u)" != 0 ]; then
        echo "install_corpus.sh: apt-get cannot find ${PACKAGES[*]}; run 'apt-get update' as root first" >&2
        exit 1
    fi
    apt-get update -qq
    (cd "$TMP" && apt-get download -qq "${PACKAGES[@]}")
fi
for deb in "$TMP"/*.deb; do dpkg-deb -x "$deb" "$TMP/root"; done
for db in "${DATABASES[@]}"; do cp "$TMP/root/usr/share/dictd/$db".{index,dict.dz} "$DEST"/; done
echo "install_corpus.sh: ${DATABASES[*]} databases in $DEST"
