"""Boot images: guests started as copies of one that booted (real wasmtime)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import wasmtime

from activities._repl_pool import ReplPool
from sandbox_wasm import ReplSession, SandboxLimits
from sandbox_wasm._boot_image import (RUN_STRING_EXPORT, STACK_POINTER_EXPORT, BootImageError,
                                      BootImageSlot, with_image_exports)
from sandbox_wasm._runtime import CACHE_DIR_ENV, get_runtime

LIMITS = SandboxLimits(cell_timeout_s=2.0, memory_bytes=64 * 1024**2)


def _image():
    """The runtime's boot image, taken by the first session of this process if needed."""
    with ReplSession(limits=LIMITS).start():
        pass
    image = get_runtime().boot_image.image
    assert image is not None
    return image


def test_guests_from_the_image_start_clean_and_apart():
    image = _image()
    with ReplSession(limits=LIMITS).start() as first, ReplSession(limits=LIMITS).start() as second:
        # Both came from the image: a failed one would have dropped it.
        assert get_runtime().boot_image.image is image
        setup = first.run_cell(
            "import builtins, json, random\n"
            "builtins.planted = 1\njson.planted = 2\nsecret = 3\n"
            "random.random()")
        assert setup.error is None, setup.traceback
        seen = second.run_cell(
            "import builtins, json, random\n"
            "(hasattr(builtins, 'planted'), hasattr(json, 'planted'), 'secret' in globals(),\n"
            " sorted(n for n in globals() if n.islower() and not n.startswith('_')))")
        assert seen.error is None, seen.traceback
        assert seen.value_repr == ("(False, False, False, ['builtins', 'document', "
                                   "'document_names', 'json', 'llm_query', 'llm_query_batched', "
                                   "'random', 'rlm_query', 'rlm_query_batched'])")
        # Each guest seeds its own random numbers.
        assert second.run_cell("random.random()").value_repr != setup.value_repr


def test_a_guest_from_the_image_walks_its_frames_and_keeps_its_limits():
    _image()
    with ReplSession(limits=LIMITS).start() as session:
        result = session.run_cell(
            "import sys, time, traceback, warnings\n"
            "depth, frame = 0, sys._getframe()\n"
            "while frame is not None:\n    depth, frame = depth + 1, frame.f_back\n"
            "stack = traceback.format_stack()\n"
            "warnings.warn('far up', stacklevel=depth + 5)\n"
            "try:\n    time.sleep(30)\nexcept TimeoutError as exc:\n    slept = str(exc)\n"
            "(depth < 20, stack[-1].strip().startswith('File \"<cell 1>\"'), 'time limit' in slept)")
        assert result.error is None, result.traceback
        assert result.value_repr == "(True, True, True)"
        failed = session.run_cell("def f():\n    return 1 / 0\nf()")
        assert failed.error == "ZeroDivisionError: division by zero"
        assert 'File "<cell 2>", line 2, in f' in failed.traceback
        spin = session.run_cell("while True:\n    pass")
        assert spin.limit is not None and spin.limit.kind == "timeout"
        assert session.run_cell("1 + 1").value_repr == "2"


def test_a_guest_from_the_image_starts_with_what_the_image_imported():
    # rlm_driver._IMAGED_IMPORTS (and _pickle, which rlm_snapshot imports) are
    # imported before the image is taken, so no REPL pays for them again: a
    # first snapshot imported _pickle (~14 ms of CPU) and a first `import re`
    # took ~35 ms while the image was taken at the clock read that came first.
    _image()
    wanted = ("rlm_snapshot", "rlm_slices", "_pickle", "re", "json", "traceback")
    with ReplSession(limits=LIMITS).start() as session:
        assert get_runtime().boot_image.image is not None
        missing = session.run_cell(f"import sys\n[name for name in {wanted!r} if name not in sys.modules]")
        assert missing.error is None, missing.traceback
        assert missing.value_repr == "[]"
        assert session.run_cell("import re\nre.findall('b+', 'abbc')").value_repr == "['bb']"



def test_the_image_is_taken_at_the_clock_read_of_stand_still():
    # The imaged frames lie under every guest from the image: they must be
    # the driver standing still between commands, not an import in progress
    # (whose lock and half-made module every copy would inherit) nor another
    # clock read on the way there (75ff9e7 imaged at the command clock).
    _image()
    with ReplSession(limits=LIMITS).start() as session:
        walk = session.run_cell(
            "import sys\nframe, names = sys._getframe(), []\n"
            "while frame is not None:\n"
            "    names.append((frame.f_code.co_name, frame.f_code.co_filename.rsplit('/', 1)[-1]))\n"
            "    frame = frame.f_back\n"
            "names[names.index(('resume', 'rlm_driver.py')) + 2:]")
        assert walk.error is None, walk.traceback
        assert walk.value_repr == ("[('_stand_still', 'rlm_driver.py'), ('_serve', 'rlm_driver.py'), "
                                   "('main', 'rlm_driver.py'), ('<module>', '<string>')]")

def test_an_image_that_fails_is_dropped_and_the_next_guest_takes_a_new_one():
    images = get_runtime().boot_image
    good = _image()
    # Larger than the session's memory cap: entering it fails before any wasm runs.
    bad = dataclasses.replace(good, memory_bytes=LIMITS.memory_bytes + 2**20)
    images.publish(bad)
    try:
        with ReplSession(limits=LIMITS).start() as session:  # booted from scratch instead
            assert session.run_cell("21 * 2").value_repr == "42"
        assert images.image is None
        with ReplSession(limits=LIMITS).start() as session:  # booted from scratch and imaged
            assert session.run_cell("'ok'").value_repr == "'ok'"
        assert images.image is not None and images.image is not bad
        with ReplSession(limits=LIMITS).start() as session:  # from the new image
            assert session.run_cell("'again'").value_repr == "'again'"
        # That start ended the row of failures: as many more as it takes to
        # stop imaging, less one, leave the slot ready to take an image again.
        for failure in range(BootImageSlot.MAX_FAILURES - 1):
            images.failed(f"failure {failure}")
        assert images.claim()
    finally:
        images.publish(good)


def test_images_stop_after_repeated_failures():
    images = BootImageSlot()
    for failure in range(BootImageSlot.MAX_FAILURES):
        assert images.claim()
        images.failed(f"failure {failure}")
    assert not images.claim() and images.image is None


def test_a_start_from_the_image_ends_a_row_of_failures():
    images = BootImageSlot()
    for _ in range(3):  # never MAX_FAILURES in a row
        for failure in range(BootImageSlot.MAX_FAILURES - 1):
            assert images.claim()
            images.failed(f"failure {failure}")
        images.started()
    assert images.claim()


def test_the_module_carries_the_two_image_exports():
    exports = {e.name: e.type for e in get_runtime().module.exports}
    stack_pointer = exports[STACK_POINTER_EXPORT]
    assert isinstance(stack_pointer, wasmtime.GlobalType)
    assert stack_pointer.mutable and str(stack_pointer.content) == "i32"
    run_string = exports[RUN_STRING_EXPORT]
    assert isinstance(run_string, wasmtime.FuncType)
    assert [str(t) for t in run_string.params] == ["i32", "i32"]
    assert [str(t) for t in run_string.results] == ["i32"]


@pytest.mark.parametrize("wat", [
    "(module (global i32 (i32.const 0)) (export \"a\" (global 0)))",  # not mutable
    "(module (memory 1))",  # no global, no export section
])
def test_a_module_of_another_shape_is_refused(wat):
    with pytest.raises(BootImageError):
        with_image_exports(wasmtime.wat2wasm(wat))


def test_a_worker_warms_up_by_taking_the_image_in_the_background(tmp_path, monkeypatch):
    shutil.copy(get_runtime().module_path, tmp_path)  # a new runtime, without compiling again
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert get_runtime().module_path.parent == tmp_path
    assert get_runtime().boot_image.image is None
    ReplPool.warm_up().join(timeout=60)
    assert get_runtime().boot_image.image is not None
