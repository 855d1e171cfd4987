"""docs/errors.md is true: every bad input it lists gives, through the CLI, exactly the one-line
message and exit code written there; no traceback; no output folder, partial folder or temp file
left behind; no input touched (every input file has the same size, mtime and sha256 after).

The fast suite runs each case in this process (click's runner: the CLI's own code, seconds for
all); the slow suite runs each in a fresh interpreter and checks that stderr really is one line.
"""

from __future__ import annotations

import pytest

from tests._catalogue import (
    CASES,
    DOC,
    Case,
    World,
    leftovers,
    normalize,
    read_doc,
    run_in_process,
    run_subprocess,
    snapshot,
    write_config,
)


@pytest.fixture(scope="module")
def world(llama_family, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("catalogue"), family=llama_family)


@pytest.fixture(scope="module")
def world2(llama_family, tmp_path_factory) -> World:
    """A second world for the subprocess runs (same layout, so the same messages)."""
    return World(tmp_path_factory.mktemp("catalogue"), family=llama_family)


@pytest.fixture(scope="module")
def doc() -> dict[str, tuple[int, str]]:
    return read_doc(DOC)


def _params(subprocess: bool) -> list:
    """In process: every case that can run in process. In a subprocess: every case, slow except
    those that only a subprocess can run (they are fast-suite cases then)."""
    out = []
    for c in CASES:
        if c.subprocess_only and not subprocess:
            continue
        slow = c.slow or (subprocess and not c.subprocess_only)
        out.append(pytest.param(c, id=c.id, marks=[pytest.mark.slow] if slow else []))
    return out


def _check(world: World, doc: dict, case: Case, *, in_process: bool) -> None:
    d = world.cases / case.id
    d.mkdir()
    run = case.build(world, d)
    write_config(run, d)
    out = run.out or d / "out"
    cache = d / ".mergekit_bico_cache"
    out_existed = out.exists() or out.is_symlink()
    # everything the run may read: shared models + data, and this case's own inputs (OUT too
    # when it existed before: it must survive); a cache the run may rewrite is left out
    skip = (d / "cache", cache) if run.check_output else (cache,)
    skip += () if out_existed else (out,)
    before = snapshot(world.models, world.data, d, skip=skip)
    try:
        outcome = run_in_process(run, d) if in_process else run_subprocess(run, d)
    finally:
        if run.cleanup:
            run.cleanup()
    assert outcome.exception is None, outcome.traceback
    assert "Traceback" not in "\n".join(outcome.lines) and not outcome.traceback, outcome.traceback
    assert len(outcome.lines) == 1, outcome.lines
    line = normalize(outcome.lines[0], world, case.masks)
    assert "internal error" not in line
    code, message = doc[case.id]
    assert (outcome.code, line) == (code, message), f"docs/errors.md says {code} {message!r}"
    if code == 0:
        assert run.check_output is not None, "an exit-0 entry must say how its output is checked"
        run.check_output(out)
    else:
        assert line.startswith("error: ")
        if out_existed:
            assert out.exists()
        else:
            assert not out.exists() and not out.is_symlink(), "a failed run left OUT behind"
    assert leftovers(out) == []
    after = snapshot(world.models, world.data, d, skip=skip)
    assert after == before, sorted(set(before.items()) ^ set(after.items()))[:3]
    for marker in run.must_not_exist:
        assert not marker.exists(), f"{marker} exists: code from an input ran"


def test_doc_lists_every_case_once(doc):
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sorted(doc) == sorted(ids), "regenerate the table: python -m tests._catalogue"
    assert len(ids) >= 25


@pytest.mark.parametrize("case", _params(subprocess=False))
def test_bad_input(world, doc, case):
    _check(world, doc, case, in_process=True)


@pytest.mark.parametrize("case", _params(subprocess=True))
def test_bad_input_real_process(world2, doc, case):
    _check(world2, doc, case, in_process=False)
