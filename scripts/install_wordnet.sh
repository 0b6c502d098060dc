#!/usr/bin/env bash
# Install WordNet 3.0 where nltk finds it, for METEOR (eval/metrics.py), without nltk's
# downloader: the data comes from Debian's wordnet-base and wordnet-sense-index packages.
#
#   bash scripts/install_wordnet.sh [NLTK_DATA_DIR]
#
# Target: $1, else the first entry of $NLTK_DATA, else <repo>/.venv/nltk_data (which
# eval/metrics.py always searches). Idempotent: a second run only checks a stamp file.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_root="${1:-${NLTK_DATA:-$repo_root/.venv/nltk_data}}"
# NLTK_DATA may be a colon-separated search path; install into its first entry.
target_root="${target_root%%:*}"
dest="$target_root/corpora/wordnet"
stamp="$dest/.installed-from-debian"
src=/usr/share/wordnet

if [[ -f "$stamp" ]]; then
    echo "WordNet already installed in $dest"
    exit 0
fi

missing=()
for pkg in wordnet-base wordnet-sense-index; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    apt_get=(apt-get)
    if [[ $EUID -ne 0 ]]; then
        if ! command -v sudo >/dev/null; then
            echo "error: need root (or sudo) to apt-get install ${missing[*]}" >&2
            exit 1
        fi
        apt_get=(sudo apt-get)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Try without refreshing the package lists first: an update costs time and is only
    # needed on a machine whose lists are empty or stale.
    if ! "${apt_get[@]}" install -y -q --no-install-recommends "${missing[@]}"; then
        "${apt_get[@]}" update -q
        "${apt_get[@]}" install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

mkdir -p "$dest"
# Copies, not symlinks: nltk refuses a link that resolves outside its data root.
cp -f "$src"/data.* "$src"/index.* "$src"/*.exc "$dest/"

# The Debian packages do not ship lexnames, which nltk's WordNet reader opens first.
# Content from the lexnames(5WN) manual page: file number, lexicographer file, part of speech.
lexnames=(
    adj.all:3 adj.pert:3 adv.all:4 noun.Tops:1 noun.act:1 noun.animal:1 noun.artifact:1
    noun.attribute:1 noun.body:1 noun.cognition:1 noun.communication:1 noun.event:1
    noun.feeling:1 noun.food:1 noun.group:1 noun.location:1 noun.motive:1 noun.object:1
    noun.person:1 noun.phenomenon:1 noun.plant:1 noun.possession:1 noun.process:1
    noun.quantity:1 noun.relation:1 noun.shape:1 noun.state:1 noun.substance:1 noun.time:1
    verb.body:2 verb.change:2 verb.cognition:2 verb.communication:2 verb.competition:2
    verb.consumption:2 verb.contact:2 verb.creation:2 verb.emotion:2 verb.motion:2
    verb.perception:2 verb.possession:2 verb.social:2 verb.stative:2 verb.weather:2 adj.ppl:3
)
{
    for i in "${!lexnames[@]}"; do
        printf '%02d\t%s\t%s\n' "$i" "${lexnames[$i]%%:*}" "${lexnames[$i]##*:}"
    done
} >"$dest/lexnames"
if (($(wc -l <"$dest/lexnames") != 45)); then
    echo "error: $dest/lexnames does not have 45 lines" >&2
    exit 1
fi

# Written last, so an interrupted run is redone in full next time.
touch "$stamp"
echo "WordNet installed in $dest"
