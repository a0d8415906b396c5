"""drpo_megatron/operate/preempt.py: stop file, SIGTERM/SIGUSR1 -> stop requested; the exit after
the checkpoint writes the marker the batch script reads and exits with 75.  The SLURM round trip
(signal -> checkpoint -> requeue -> resume) is tests/operate/test_slurm_local.py."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from drpo_megatron.operate.preempt import EXIT_PREEMPTED, Preempted, Stopper


def test_stop_file_requests_a_stop(tmp_path):
    stop = tmp_path / "STOP"
    s = Stopper(str(stop), install_signals=False)
    assert not s.requested()
    stop.touch()
    assert s.requested() and s.reason == f"stop file {stop}"


def test_no_stop_file_configured_never_stops():
    s = Stopper(None, install_signals=False)
    assert not s.requested()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_requests_a_stop_and_close_restores_handlers(sig):
    before = signal.getsignal(sig)
    s = Stopper(None)
    try:
        os.kill(os.getpid(), sig)
        assert s.requested() and s.reason == sig.name
    finally:
        s.close()
    assert signal.getsignal(sig) == before


def test_exit_after_checkpoint_writes_marker_and_exits_75(tmp_path):
    stop = tmp_path / "STOP"
    stop.touch()
    s = Stopper(str(stop), install_signals=False)
    assert s.requested()
    with pytest.raises(Preempted) as e:
        s.exit_after_checkpoint(4)
    assert e.value.code == EXIT_PREEMPTED == 75 and e.value.step == 4
    assert (tmp_path / "STOP.checkpointed").read_text().split()[0] == "4"


def test_process_exit_code_is_75(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from drpo_megatron.operate.preempt import Stopper
        s = Stopper({str(tmp_path / 'STOP')!r})
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.requested()
        s.exit_after_checkpoint(2)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RANK="0"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 75, p.stderr
    assert (tmp_path / "STOP.checkpointed").exists()
