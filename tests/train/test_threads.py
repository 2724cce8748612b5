"""The default CPU thread count: the idle cores, at least one; OMP_NUM_THREADS wins; --threads is validated."""

import pytest

from nanoseek.train.config import TrainConfig
from nanoseek.train.threads import default_threads


@pytest.mark.parametrize("cores,load,want", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.2, 1), (2, 9.0, 1), (16, 3.6, 12)])
def test_idle_cores_at_least_one(cores, load, want):
    assert default_threads(cores, load) == want


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert 1 <= default_threads()


def test_negative_threads_is_named():
    with pytest.raises(ValueError, match="threads=-1"):
        TrainConfig(threads=-1).validate()
