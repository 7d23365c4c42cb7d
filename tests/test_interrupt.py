"""Ctrl-C handling (logitcache/core/interrupt.py), in a fresh interpreter so the process-wide hooks stay there."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from logitcache.core import interrupt

    class HalfBuilt:
        def __del__(self):
            raise AttributeError("no attribute '_shutdown'")

    interrupt.install()
    if sys.argv[1] == "after-ctrl-c":
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
    obj = HalfBuilt()
    del obj
""")


def run(case):
    return subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=60)


def test_destructor_noise_after_ctrl_c_is_not_printed():
    done = run("after-ctrl-c")
    assert done.returncode == 0 and done.stderr == ""


def test_destructor_errors_without_ctrl_c_are_still_printed():
    done = run("no-signal")
    assert "AttributeError: no attribute '_shutdown'" in done.stderr
