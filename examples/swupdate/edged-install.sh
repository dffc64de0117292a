#!/bin/sh
# SWUpdate runs this before ("preinst": the bundle's directory) and after ("postinst") it writes
# the bundle. After, it pushes the bundle to the daemon and installs it: the update fails when
# edged refuses the bundle or its health gate rolls the version back, and the old version serves
# on. The daemon is $EDGED_CONTROL's, by default the local one.
set -eu
BUNDLE=/var/lib/edged/swupdate/edged.bundle
EDGECTL=${EDGECTL:-/opt/edged/bin/edgectl}
case "$1" in
preinst)
    mkdir -p "$(dirname "$BUNDLE")"
    ;;
postinst)
    status=0
    "$EDGECTL" push "$BUNDLE" || status=$?
    rm -f "$BUNDLE"
    exit "$status"
    ;;
esac
