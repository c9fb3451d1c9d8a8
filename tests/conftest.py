"""Shared test fixtures.

Tests that need the real data sets get them through the `data_dir` fixture: the directory named by
the env var NANOLLM_DATA, default `../shared/data` beside the checkout. When it is missing the test
is skipped with the reason, except under CI (CI=true), where a missing data directory fails the run.
"""
import os
import sys
from pathlib import Path

# The tests' models are tiny: one thread is faster than several fighting over the cores (by 3-15x when
# other jobs share the machine), for this process and the scripts the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `from model import ...` in tests, from any working directory


def _data_dir() -> Path:
    return Path(os.environ.get("NANOLLM_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not path.is_dir():
        msg = f"real data directory {path} not found (set NANOLLM_DATA to the shared data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Torch in this process on one thread, whatever OMP_NUM_THREADS says: the models are tiny."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def refused(capsys):
    """refused(main, *args): run a script's main() in this process on a command line it must refuse;
    returns (exit code, stderr) as python would give them: sys.exit("message") is exit code 1 with the
    message printed on stderr."""
    def run(main, *args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(map(str, args)))
        code, err = exit_info.value.code, capsys.readouterr().err
        if isinstance(code, str):
            return 1, f"{err}{code}\n"
        return code, err
    return run
