# shellcheck shell=bash
# Helpers for a Debian root built from this host's configuration, sourced by
# arm64/emulated-test.sh and systemd/boot-test.sh (the caller sets ROOT and SUITE): the mirror
# the host's apt uses, and the host's pip configuration copied into the root.

# The Debian mirror the host's apt already uses for $SUITE (deb822 .sources or one-line .list
# files): the only one this host may be able to reach, and no hostname is written down here.
host_mirror() {
    local sources=() file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -r $file ]] && sources+=("$file")
    done
    if ((${#sources[@]})); then
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; suites = ""; uris = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    key = tolower(line); sub(/:.*/, "", key)
                    value = line; sub(/^[^:]*:[ \t]*/, "", value)
                    if (key == "types") types = value
                    else if (key == "suites") suites = value
                    else if (key == "uris") uris = value
                    else if (key == "enabled") enabled = tolower(value)
                }
                if (enabled == "no" || (" " types " ") !~ / deb /) next
                if ((" " suites " ") ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "${sources[@]}"
    fi
    local lists=()
    [[ -r /etc/apt/sources.list ]] && lists+=(/etc/apt/sources.list)
    for file in /etc/apt/sources.list.d/*.list; do
        [[ -r $file ]] && lists+=("$file")
    done
    if ((${#lists[@]})); then
        # deb [options] URI SUITE COMPONENT...
        sed -E 's/\[[^]]*\]//' "${lists[@]}" |
            awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }'
    fi
}

# The host's pip configuration files, copied to the same places in the root (the user's under
# /root); copies from an earlier run go first. The files copied are listed in pip_configs.
copy_host_pip_config() {
    rm -rf "$ROOT/etc/pip.conf" "$ROOT/etc/xdg/pip" "$ROOT/root/.config/pip" "$ROOT/root/.pip"
    pip_configs=()
    copy_config /etc/pip.conf /etc/pip.conf
    copy_config /etc/xdg/pip /etc/xdg/pip
    copy_config "${HOME:-/root}/.config/pip" /root/.config/pip
    copy_config "${HOME:-/root}/.pip" /root/.pip
    if [[ -n ${PIP_CONFIG_FILE:-} ]]; then copy_config "$PIP_CONFIG_FILE" "$PIP_CONFIG_FILE"; fi
}

copy_config() { # copy_config HOST_PATH ROOT_PATH
    [[ -e $1 ]] || return 0
    mkdir -p "$(dirname "$ROOT$2")"
    cp -a "$1" "$ROOT$2"
    if [[ -d $1 ]]; then
        while IFS= read -r -d '' file; do pip_configs+=("$file"); done < <(find "$1" -type f -print0)
    else
        pip_configs+=("$1")
    fi
}

local_paths() { # absolute paths and file:// URLs in the pip config files and PIP_* variables
    {
        ((${#pip_configs[@]})) && grep -hv '^[[:space:]]*[#;]' "${pip_configs[@]}"
        env | sed -n 's/^PIP_[A-Z_]*=//p'
    } | tr -s ' \t=,' '\n' | sed -n -e 's#^file://##' -e '\#^/#p' | sort -u
}
