"""Check a DeepSpeed hostfile before a multi-node launch: every line parses and every host
answers ssh the way the launcher will reach it.

    python -m launch.hostfile_check HOSTFILE [--ssh_port PORT] [--timeout SECONDS] \\
        && deepspeed --hostfile HOSTFILE launch/train.py ...

Why a separate step: `deepspeed --hostfile` ssh-es into the hosts (through pdsh) before any of our
code runs. Given a host it cannot reach it either stops with a traceback (its own check, which
tries only the first host) or, with --no_ssh_check, leaves pdsh to fail or wait on each host in
turn. This script checks every host, in parallel, with the same ssh options pdsh gets
(PDSH_SSH_ARGS_APPEND), and says what is wrong in one line: `error: ...`, exit status 2.

Hostfile format (DeepSpeed's): one `HOSTNAME slots=N` per line (N processes, one per GPU);
blank lines and `#` comments are ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runnable as `python launch/hostfile_check.py` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alora_ds.errors import InputError, run_cli  # noqa: E402

_LINE = re.compile(r"^(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(path: Path) -> list[Host]:
    """The hosts of a DeepSpeed hostfile; a malformed line is an InputError naming it."""
    if not path.is_file():
        raise InputError(f"hostfile {path} does not exist")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        match = _LINE.match(text)
        if match is None:
            raise InputError(
                f"hostfile {path} line {number}: expected 'HOSTNAME slots=N', got {text!r}"
            )
        name, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) == 0:
            raise InputError(
                f"hostfile {path} line {number}: slots must be a positive integer, got {slots!r}"
            )
        if name in seen:
            raise InputError(
                f"hostfile {path} line {number}: host {name!r} already given on line {seen[name]}"
            )
        seen[name] = number
        hosts.append(Host(name, int(slots), number))
    if not hosts:
        raise InputError(f"hostfile {path} names no host")
    return hosts


def ssh_command(host: str, port: int | None, timeout: int) -> list[str]:
    """The ssh call pdsh makes for DeepSpeed, plus batch mode (never prompt) and a timeout."""
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}"]
    command += shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    if port is not None:
        command += ["-p", str(port)]
    return [*command, host, "true"]


def reach(host: Host, port: int | None, timeout: int) -> str | None:
    """None if `ssh host true` works, else ssh's last line of complaint."""
    try:
        result = subprocess.run(
            ssh_command(host.name, port, timeout),
            capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout + 5} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exited with status {result.returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.hostfile_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("hostfile", help="DeepSpeed hostfile (HOSTNAME slots=N per line)")
    parser.add_argument("--ssh_port", type=int, default=None, help="as deepspeed --ssh_port")
    parser.add_argument("--timeout", type=int, default=10, help="seconds to wait for each host")
    args = parser.parse_args(argv)
    path = Path(args.hostfile)
    hosts = parse_hostfile(path)
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        problems = list(pool.map(lambda h: reach(h, args.ssh_port, args.timeout), hosts))
    failed = [(h, p) for h, p in zip(hosts, problems, strict=True) if p is not None]
    if failed:
        host, problem = failed[0]
        others = f" (and {len(failed) - 1} more: {', '.join(h.name for h, _ in failed[1:])})"
        raise InputError(
            f"hostfile {path} line {host.line}: cannot ssh to {host.name!r}: {problem}"
            + (others if len(failed) > 1 else "")
        )
    slots = sum(h.slots for h in hosts)
    print(f"hostfile {path}: {len(hosts)} host(s), {slots} slots, all reachable by ssh")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
