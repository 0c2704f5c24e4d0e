"""The WASM REPL: cells, host calls, output, protected names, context (real wasmtime)."""

from __future__ import annotations

import threading

import pytest

from sandbox_wasm import ReplSession, SandboxError, SandboxLimits

SMALL = SandboxLimits(cell_timeout_s=2.0, memory_bytes=512 * 1024**2, output_chars=200,
                      full_output_chars=5_000)


class HostLog:
    """Host functions that record how they were called."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def functions(self):
        def record(name, result):
            def fn(*args, **kwargs):
                self.calls.append((name, args, kwargs))
                return result(*args, **kwargs)
            return fn

        return {
            "llm_query": record("llm_query", lambda p, model=None: f"answer to {p} by {model}"),
            "llm_query_batched": record("llm_query_batched",
                                        lambda ps, model=None: [f"a{i}:{p}" for i, p in enumerate(ps)]),
            "rlm_query": record("rlm_query", lambda q, context=None, model=None: f"rlm {q} {context}"),
            "rlm_query_batched": record("rlm_query_batched",
                                        lambda qs, contexts=None, model=None: [q.upper() for q in qs]),
            "FINAL": record("FINAL", lambda answer: None),
            "FINAL_VAR": record("FINAL_VAR", lambda name, value: None),
            "echo": record("echo", lambda *a, **k: [list(a), k]),
            "size": record("size", lambda s: len(s)),
            "fail": record("fail", self._fail),
            "give_set": record("give_set", lambda: {1, 2}),
        }

    @staticmethod
    def _fail(message):
        raise ValueError(message)


@pytest.fixture(scope="module")
def host():
    return HostLog()


@pytest.fixture(scope="module")
def repl(host, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ctx")
    (directory / "one.txt").write_text("first document é", encoding="utf-8")
    (directory / "two.txt").write_text("second", encoding="utf-8")
    with ReplSession(limits=SMALL, host_functions=host.functions()) as session:
        session.load_context([directory / "one.txt", directory / "two.txt"], "list")
        yield session


def test_state_persists_and_last_expression_is_returned(repl):
    first = repl.run_cell("counter = 41\nprint('set', counter)")
    assert first.output == "set 41\n" and first.error is None and first.value_repr is None
    second = repl.run_cell("counter += 1\ncounter")
    assert second.value_repr == "42" and second.output == ""
    assert second.duration_s > 0


def test_stdout_and_stderr_interleave_in_print_order(repl):
    result = repl.run_cell("import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')")
    assert result.output == "a\nb\nc\n"


def test_exception_gives_error_and_traceback_from_the_cell(repl):
    result = repl.run_cell("def inner():\n    return 1 / 0\ninner()")
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "<cell' in result.traceback and "inner" in result.traceback
    assert "/rlm/guest" not in result.traceback
    assert repl.run_cell("'still alive'").value_repr == "'still alive'"


def test_syntax_error_is_reported(repl):
    result = repl.run_cell("def broken(:\n    pass")
    assert result.error.startswith("SyntaxError")


def test_sys_exit_does_not_end_the_repl(repl):
    result = repl.run_cell("import sys\nsys.exit(3)")
    assert result.error == "SystemExit: 3"
    assert repl.run_cell("2 + 2").value_repr == "4"


def test_every_standard_host_call(repl, host):
    host.calls.clear()
    code = (
        "r1 = llm_query('p1')\n"
        "r2 = llm_query_batched(['x', 'y'], model='small')\n"
        "r3 = rlm_query('q', context='ctx')\n"
        "r4 = rlm_query_batched(['u', 'v'], contexts=['c1', 'c2'])\n"
        "answer = 'done!'\n"
        "FINAL(123)\n"
        "FINAL_VAR('answer')\n"
        "(r1, r2, r3, r4)"
    )
    result = repl.run_cell(code)
    assert result.error is None
    assert result.value_repr == repr(("answer to p1 by None", ["a0:x", "a1:y"], "rlm q ctx",
                                      ["U", "V"]))
    assert host.calls == [
        ("llm_query", ("p1",), {"model": None}),
        ("llm_query_batched", (["x", "y"],), {"model": "small"}),
        ("rlm_query", ("q",), {"context": "ctx", "model": None}),
        ("rlm_query_batched", (["u", "v"],), {"contexts": ["c1", "c2"], "model": None}),
        ("FINAL", ("123",), {}),
        ("FINAL_VAR", ("answer", "done!"), {}),
    ]


def test_extra_host_function_gets_positional_and_keyword_values(repl):
    value = {"k": [1, 2.5, None, True, False, b"\x00\xff", "é", 2**80, -(2**70)], 7: "int key"}
    result = repl.run_cell(f"echo(1, 'two', b'3', data={value!r})")
    assert result.error is None
    assert eval(result.value_repr) == [[1, "two", b"3"], {"data": value}]


def test_host_functions_run_in_the_thread_that_runs_the_cell():
    seen = []
    with ReplSession(limits=SMALL, host_functions={"where": lambda: seen.append(
            threading.get_ident())}) as session:
        assert session.run_cell("where()\nwhere()").error is None
    assert seen == [threading.get_ident()] * 2


def test_final_var_of_missing_name_is_a_clear_name_error(repl):
    result = repl.run_cell("FINAL_VAR('no_such_variable')")
    assert result.error.startswith("NameError") and "no_such_variable" in result.error


def test_host_exception_becomes_guest_exception(repl):
    result = repl.run_cell(
        "try:\n    fail('boom')\nexcept HostCallError as exc:\n    caught = str(exc)\ncaught")
    assert "ValueError: boom" in result.value_repr
    uncaught = repl.run_cell("fail('again')")
    assert uncaught.error.startswith("HostCallError") and "again" in uncaught.error
    assert repl.run_cell("1 + 1").value_repr == "2"


def test_unsendable_values_fail_cleanly_both_ways(repl):
    sent = repl.run_cell("echo({1, 2})")
    assert sent.error.startswith("TypeError") and "set" in sent.error
    returned = repl.run_cell("give_set()")
    assert returned.error.startswith("HostCallError") and "cannot be sent" in returned.error


def test_unregistered_standard_function_raises_in_guest():
    with ReplSession(limits=SMALL, host_functions={}) as session:
        result = session.run_cell("llm_query('hi')")
        assert result.error.startswith("HostCallError")
        assert "llm_query" in result.error and "not available" in result.error


def test_large_payloads_travel_as_bytes():
    limits = SandboxLimits(cell_timeout_s=30.0, memory_bytes=1024**3)
    functions = {"size": len, "make": lambda n: "z" * n, "blob": lambda n: b"\x01" * n}
    with ReplSession(limits=limits, host_functions=functions) as session:
        big_in = session.run_cell("size('é' * 50_000_000)")  # 100 MB of UTF-8
        assert big_in.error is None and big_in.value_repr == str(50_000_000)
        big_out = session.run_cell("s = make(20_000_000)\nb = blob(5_000_000)\n(len(s), len(b), s[-1])")
        assert big_out.value_repr == "(20000000, 5000000, 'z')"


def test_output_is_capped_with_marker_and_full_output_kept(repl):
    result = repl.run_cell("print('x' * 1000)")
    assert result.output.startswith("x" * 200)
    assert "[output truncated: 801 more chars]" in result.output
    assert result.full_output == "x" * 1000 + "\n"
    assert result.limit.kind == "output" and result.limit.limit == 200


def test_full_output_has_a_hard_ceiling(repl):
    result = repl.run_cell("for i in range(100):\n    print('y' * 999)")
    assert result.full_output.startswith("y" * 999)
    assert "[full output truncated: 95,000 more chars]" in result.full_output
    assert "[output truncated: 99,800 more chars]" in result.output


def test_protected_names_are_restored_and_reported(repl):
    result = repl.run_cell("llm_query = 'mine'\ndel FINAL\ncontext = None")
    assert sorted(result.restored_names) == ["FINAL", "context", "llm_query"]
    assert "restored" in result.output and "llm_query" in result.output
    check = repl.run_cell("(callable(llm_query), callable(FINAL), context[1])")
    assert check.value_repr == "(True, True, 'second')" and check.restored_names == []


def test_in_place_change_of_list_context_is_undone(repl):
    result = repl.run_cell("context.append('extra')\ncontext[0] = 'changed'")
    assert result.restored_names == ["context"]
    assert repl.run_cell("context").value_repr == repr(["first document é", "second"])


def test_reordered_list_context_is_undone(repl):
    # Same length, same documents, another order: only identity tells.
    assert repl.run_cell("context.reverse()").restored_names == ["context"]
    assert repl.run_cell("context").value_repr == repr(["first document é", "second"])


def test_show_vars_lists_user_variables(repl):
    repl.run_cell("items = [1, 2, 3]\nname = 'abc'")
    listing = repl.run_cell("print(SHOW_VARS())").output
    assert "items: list, len 3" in listing and "name: str, len 3" in listing
    assert "context: list, len 2" in listing
    assert "llm_query" not in listing and "FINAL" not in listing


def test_load_context_as_single_str(tmp_path):
    (tmp_path / "doc.txt").write_text("line one\nline two\n", encoding="utf-8")
    with ReplSession(limits=SMALL) as session:
        session.load_context([tmp_path / "doc.txt"], "str")
        result = session.run_cell("type(context).__name__, len(context), context.splitlines()[1]")
        assert result.value_repr == "('str', 18, 'line two')"


@pytest.mark.parametrize("words", ["é ☕ 𝄞", "plain ascii"])
def test_many_documents_load_exactly_across_read_batches(tmp_path, words):
    # The guest reads documents in batches of 8 MiB (guest/rlm_driver.py
    # LOAD_BATCH_BYTES), each filled by the host from consecutive files: empty
    # documents, multi-byte characters and a document larger than a batch
    # must all land whole and in order. An ASCII batch is decoded at once and
    # cut by the documents' sizes.
    texts = [f"doc {i} {words} " * ((i + 1) % 7) for i in range(3000)]
    texts[1500] = "big " + "x" * (9 << 20) + " end"
    texts[1501] = ""
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i:06d}.txt")
        files[-1].write_text(text, encoding="utf-8")
    with ReplSession(limits=SMALL) as session:
        session.load_context(files, "list")
        # Compared in the guest: a result's repr is cut at 200 characters.
        lengths = f"[len(d) for d in context] == {[len(t) for t in texts]!r}"
        assert session.run_cell(lengths).value_repr == "True"
        edges = f"[(d[:12], d[-12:]) for d in context] == {[(t[:12], t[-12:]) for t in texts]!r}"
        assert session.run_cell(edges).value_repr == "True"


def test_a_document_that_is_not_utf8_is_named_by_its_index_inside_a_batch(tmp_path):
    files = [tmp_path / f"{i}.txt" for i in range(4)]
    for i, path in enumerate(files):
        path.write_bytes(b"fine" if i != 2 else b"ok \xff\xfe")
    with ReplSession(limits=SMALL) as session:
        with pytest.raises(SandboxError, match="context document 2 is not valid UTF-8"):
            session.load_context(files, "list")
        session.load_context(files[:2], "list")  # the REPL goes on
        assert session.run_cell("context").value_repr == "['fine', 'fine']"


def test_load_context_rejects_bad_input_clearly(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    other = tmp_path / "sub"
    other.mkdir()
    (other / "b.txt").write_text("b")
    with ReplSession(limits=SMALL) as session:
        with pytest.raises(ValueError, match="exactly one document"):
            session.load_context([tmp_path / "a.txt", other / "b.txt"], "str")
        with pytest.raises(ValueError, match="one directory"):
            session.load_context([tmp_path / "a.txt", other / "b.txt"], "list")
        # One directory however it is named (its parents are resolved, once each).
        (tmp_path / "link").symlink_to(other)
        session.load_context([tmp_path / "link" / "b.txt", tmp_path / "sub" / ".." / "sub" / "b.txt"], "list")
        assert session.run_cell("context").value_repr == "['b', 'b']"
        with pytest.raises(ValueError, match="does not exist"):
            session.load_context([tmp_path / "missing.txt"], "list")
        with pytest.raises(ValueError, match="kind must be"):
            session.load_context([tmp_path / "a.txt"], "bytes")  # type: ignore[arg-type]
        with pytest.raises(SandboxError, match="not valid UTF-8"):
            session.load_context([tmp_path / "bad.txt"], "str")
        session.load_context([tmp_path / "a.txt"], "str")
        assert session.run_cell("context").value_repr == "'a'"


def test_bad_host_function_names_are_rejected():
    with pytest.raises(ValueError, match="public Python identifier"):
        ReplSession(host_functions={"not valid": len})
    with pytest.raises(TypeError, match="not callable"):
        ReplSession(host_functions={"thing": 3})


def test_run_cell_before_start_is_a_clear_error():
    with pytest.raises(SandboxError, match="start"):
        ReplSession().run_cell("1")
