#!/usr/bin/env bash
# Install what tests/launch/test_slurm.py runs the multi-node launch paths with, from Debian:
#   slurm-wlm       slurmctld, slurmd, sbatch, srun, sinfo (a throw-away cluster of three nodes)
#   pdsh            DeepSpeed's default multi-node launcher (`deepspeed --hostfile`)
#   openssh-server  the sshd that pdsh reaches each node through (started by the test on each
#                   node with its own key, never as a system service)
#   iproute2        `ip`: the test's nodes are network namespaces joined by a bridge
#
#   bash scripts/install_slurm.sh
#
# Idempotent: when every tool is already on PATH it only says so. Needs root (or password-less
# sudo) to apt-get; exits non-zero with one line on stderr when it cannot install.
set -euo pipefail

packages=(slurm-wlm pdsh openssh-server iproute2)

missing_tools() {
    local tool
    for tool in slurmctld slurmd sbatch srun sinfo pdsh sshd ip; do
        command -v "$tool" >/dev/null || [[ -x "/usr/sbin/$tool" ]] || echo "$tool"
    done
}

# (sbatch --version wants a slurm.conf; the package version needs none.)
version() {
    dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null || echo "Slurm"
}

if [[ -z "$(missing_tools)" ]]; then
    echo "$(version), pdsh, sshd and ip already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "error: $(missing_tools | tr '\n' ' ')not installed and there is no apt-get to install ${packages[*]}" >&2
    exit 1
fi
apt_get=(apt-get)
if [[ $EUID -ne 0 ]]; then
    if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
        echo "error: need root (or password-less sudo) to apt-get install ${packages[*]}" >&2
        exit 1
    fi
    apt_get=(sudo apt-get)
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Try without refreshing the package lists first: an update costs time and is only needed on a
# machine whose lists are empty or stale. The packages' own services are not needed (the test
# starts its daemons with its own configs), so their start failing in a container is harmless.
if ! "${apt_get[@]}" install -y -q --no-install-recommends "${packages[@]}" >"$log" 2>&1; then
    if ! { "${apt_get[@]}" update -q && "${apt_get[@]}" install -y -q --no-install-recommends "${packages[@]}"; } >"$log" 2>&1; then
        reason=$(grep -E '^E:' "$log" | head -n 1 || true)
        echo "error: apt-get install ${packages[*]} failed: ${reason:-$(tail -n 1 "$log")}" >&2
        exit 1
    fi
fi

still=$(missing_tools | tr '\n' ' ')
if [[ -n "$still" ]]; then
    echo "error: ${packages[*]} installed but ${still}not found" >&2
    exit 1
fi
echo "$(version), pdsh, sshd and ip installed"
