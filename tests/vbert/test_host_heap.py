"""keep_host_heap: freed activations' pages stay with the process (glibc), so the next pass does not fault them in."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from dispatcher.config import ServerConfig
from vbert.device import keep_host_heap

# A real process allocates and frees tensors the sizes of a batch's activations (4, 24 and 40 MB: the last one
# above the largest block glibc's own threshold keeps in the heap), 12 times, and prints its minor page faults
# after the first round.
# With a command's name as second argument, the setting comes from that `vbert` command's --host-heap-keep-mb instead
# (the command then stops on an output path that exists, after its option took effect).
PROBE = """
import resource, sys, torch
from vbert.device import keep_host_heap
if len(sys.argv) > 2:
    import click
    from dispatcher.cli import main
    try:
        main([sys.argv[2], "--host-heap-keep-mb", sys.argv[1], *sys.argv[3:]], standalone_mode=False)
    except click.UsageError as e:
        print("kept", "exists" in str(e))
else:
    print("kept", keep_host_heap(int(sys.argv[1])))
def round_():
    for n in (1 << 20, 6 << 20, 10 << 20):             # float32 elements: 4, 24, 40 MB
        t = torch.empty(n).fill_(1.0)
        del t
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    round_()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep_mb: int, *command: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(keep_mb), *command], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[1] == "True", int(out[3])


# The 40 MB block is 10,240 pages: with glibc's defaults each of the 12 rounds maps it anew; with the heap kept, the
# rounds reuse it, apart from at most one more mapping of it (CI saw exactly 10,240 faults once, an allocation that
# found the heap's top taken: the steady state still faults nothing).
ROUND_PAGES = 10_240


def _assert_kept_stops_the_faults(faults_kept: int, faults_default: int) -> None:
    assert faults_default > 12 * 10_000, faults_default
    assert faults_kept < 2 * ROUND_PAGES, (faults_kept, faults_default)


def _has_mallopt() -> bool:
    try:
        ctypes.CDLL(None).mallopt
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _has_mallopt(), reason="the C library has no mallopt (not glibc)")
def test_kept_heap_stops_the_page_faults_of_repeated_activations():
    kept, faults_kept = _faults(512)
    default, faults_default = _faults(0)
    assert kept and not default
    _assert_kept_stops_the_faults(faults_kept, faults_default)


@pytest.mark.skipif(not _has_mallopt(), reason="the C library has no mallopt (not glibc)")
def test_the_training_commands_keep_the_heap_by_default_and_their_option_turns_it_off(tmp_path):
    """train, evaluate, distill and build-table take --host-heap-keep-mb (default: the server's); build-table in a
    real process here: with the default the rounds do not fault, with 0 they fault as glibc's defaults do."""
    from training.cli import COMMANDS, HOST_HEAP_KEEP_MB

    computing = {"train", "evaluate", "distill", "build-table"}
    for command in COMMANDS:
        option = [p for p in command.params if p.name == "host_heap_keep_mb"]
        assert bool(option) == (command.name in computing), command.name
        if option:
            assert option[0].default == HOST_HEAP_KEEP_MB == ServerConfig().host_heap_keep_mb
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"")
    args = ("build-table", "--corpus", str(out), "--out", str(out))
    ran, faults_kept = _faults(HOST_HEAP_KEEP_MB, *args)
    ran_off, faults_off = _faults(0, *args)
    assert ran and ran_off
    _assert_kept_stops_the_faults(faults_kept, faults_off)


def test_keep_host_heap_refuses_a_negative_size_and_zero_changes_nothing():
    with pytest.raises(ValueError, match="keep_mb must be >= 0"):
        keep_host_heap(-1)
    assert keep_host_heap(0) is False


def test_server_config_validates_host_heap_keep_mb():
    assert ServerConfig().host_heap_keep_mb == 512
    assert ServerConfig(host_heap_keep_mb=0).host_heap_keep_mb == 0
    with pytest.raises(ValueError, match="host_heap_keep_mb must be >= 0"):
        ServerConfig(host_heap_keep_mb=-5)
