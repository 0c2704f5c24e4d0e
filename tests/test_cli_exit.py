"""How the `rlm` command ends (cli/main.py): without tearing the interpreter
down (60-90 ms after every command), but with what registered for exit run,
its output flushed and its exit code kept; and a normal exit while a thread
that is not a daemon still works.

Each case runs a real `rlm` entry in a subprocess: `os._exit` would end pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )


def test_leaving_runs_exit_callbacks_flushes_output_and_keeps_the_code() -> None:
    proc = _python(
        """
        import atexit, sys
        from cli import main
        atexit.register(lambda: print("exit callback ran"))
        sys.stdout.write("buffered, no newline")  # a pipe: held in the buffer until flushed
        main._leave(4)
        print("never printed")
        """
    )
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == "buffered, no newlineexit callback ran\n"


def test_the_command_ends_normally_while_a_non_daemon_thread_works() -> None:
    proc = _python(
        """
        import sys, threading
        from cli import main
        gate = threading.Event()
        worker = threading.Thread(target=lambda: (gate.wait(), print("thread finished")))
        worker.start()
        sys.argv = ["rlm", "schema"]
        code = main.main()  # returns: a leave now would cut the thread off
        gate.set()
        sys.exit(code)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("thread finished")
    assert '"RunRequest"' in proc.stdout


def test_the_command_line_entry_leaves_once_its_command_is_done() -> None:
    proc = _python(
        """
        import atexit, sys
        from cli import main
        atexit.register(lambda: print("exit callback ran"))
        sys.argv = ["rlm", "schema"]
        main.main()  # leaves: no thread is left working
        print("main returned")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "main returned" not in proc.stdout
    assert proc.stdout.rstrip().endswith("exit callback ran") and '"RunRequest"' in proc.stdout
