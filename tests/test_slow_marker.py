"""`@pytest.mark.slow` (setup.cfg) is skipped unless RUN_SLOW says yes, read as transformers' `@slow` reads it."""

import pytest


TESTS = """
import pytest


@pytest.mark.slow
def test_heavy():
    pass


def test_light():
    pass
"""


@pytest.fixture()
def suite(pytester):
    # the hooks under test, from this repository's conftest
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems, pytest_configure")
    pytester.makeini("[pytest]\nmarkers =\n    slow: heavy test")
    pytester.makepyfile(test_suite=TESTS)
    return pytester


@pytest.mark.parametrize("value", [None, "0", "no", "False", "off", "n"])
def test_slow_tests_are_skipped_without_a_yes(suite, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("RUN_SLOW", raising=False)
    else:
        monkeypatch.setenv("RUN_SLOW", value)
    result = suite.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_suite.py:*slow test: set RUN_SLOW=1 to run it*"])


@pytest.mark.parametrize("value", ["1", "yes", "TRUE", "on", "y", "t"])
def test_slow_tests_run_with_a_yes(suite, monkeypatch, value):
    monkeypatch.setenv("RUN_SLOW", value)
    suite.runpytest().assert_outcomes(passed=2)


def test_a_value_that_is_neither_yes_nor_no_is_a_usage_error(suite, monkeypatch):
    monkeypatch.setenv("RUN_SLOW", "sometimes")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*RUN_SLOW='sometimes' is not a yes/no value*set RUN_SLOW=1*"])


def test_transformers_slow_decorator_agrees(monkeypatch):
    """The values above are the ones transformers' `@slow` takes as yes / no / an error."""
    from transformers.testing_utils import parse_flag_from_env

    for value in ("1", "yes", "TRUE", "on", "y", "t"):
        monkeypatch.setenv("RUN_SLOW", value)
        assert parse_flag_from_env("RUN_SLOW") == 1
    for value in ("0", "no", "False", "off", "n"):
        monkeypatch.setenv("RUN_SLOW", value)
        assert parse_flag_from_env("RUN_SLOW") == 0
    monkeypatch.setenv("RUN_SLOW", "sometimes")
    with pytest.raises(ValueError, match="RUN_SLOW"):
        parse_flag_from_env("RUN_SLOW")
