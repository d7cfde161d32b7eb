"""The one error path: exit codes, the one line, where the traceback goes, and cleanup that never
replaces the error in flight."""

import pytest

from rlhf_system import errors
from rlhf_system.cli import main
from rlhf_system.config import ConfigError
from rlhf_system.placement.group import GroupCallError


def _raised(e: BaseException) -> BaseException:
    try:
        raise e
    except BaseException as caught:
        return caught


def test_a_users_error_inside_a_worker_is_still_bad_input():
    cause = ConfigError("model.dtype=float16 is not supported on this worker's device")
    try:
        try:
            raise cause
        except ConfigError as c:
            raise GroupCallError("actor rank 1: 'setup' failed: ConfigError: ...") from c
    except GroupCallError as e:
        wrapped = e
    assert errors.exit_code(wrapped) == 2
    assert errors.one_line(wrapped) == str(cause)


def test_a_bug_is_exit_1_with_its_type_and_the_traceback_in_the_run_folder(tmp_path):
    e = _raised(KeyError("boom\nsecond line"))
    line, code = errors.report(e, str(tmp_path))
    assert code == 1 and "\n" not in line
    assert line.startswith("KeyError: 'boom") and line.endswith(f"(traceback: {tmp_path / 'error.log'})")
    assert "Traceback (most recent call last)" in (tmp_path / "error.log").read_text()


def test_a_run_folder_that_does_not_exist_is_not_created_for_the_log(tmp_path):
    line, code = errors.report(_raised(RuntimeError("x")), str(tmp_path / "never"))
    assert code == 1 and not (tmp_path / "never").exists()
    assert "rlhf-errors" in line


def test_runtime_failure_keeps_its_own_words_and_the_resume_hint(tmp_path):
    line, code = errors.report(_raised(GroupCallError("rollout: engine 0 died")), str(tmp_path),
                               "resume with checkpoint.resume=auto")
    assert code == 1 and line.startswith("rollout: engine 0 died; resume with checkpoint.resume=auto (traceback: ")


def test_cleanup_after_a_failure_never_raises_and_runs_every_step():
    ran = []

    def bad():
        ran.append("bad")
        raise FileNotFoundError("metrics.jsonl")

    errors.cleanup(True, bad, lambda: ran.append("next"))
    assert ran == ["bad", "next"]
    with pytest.raises(FileNotFoundError):  # after a success the cleanup's own error is reported
        errors.cleanup(False, bad, lambda: ran.append("still runs"))
    assert ran[-1] == "still runs"


def test_cli_reports_an_unexpected_exception_as_one_line(monkeypatch, capsys, tmp_path):
    import rlhf_system.cli as cli

    def explode(args):
        args.state["run_dir"] = str(tmp_path)
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_config", explode)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ZeroDivisionError: division by zero (traceback: ")
    assert "ZeroDivisionError" in (tmp_path / "error.log").read_text()
