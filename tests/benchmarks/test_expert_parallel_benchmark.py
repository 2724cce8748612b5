"""benchmarks/expert_parallel.py runs end to end (few tokens, few steps) and its traffic table shows what
node-limited routing claims: a token reaches at most topk_group ranks, dedup sends fewer rows than copies."""

import pytest

from .test_finetune_benchmarks import _run


@pytest.mark.slow
def test_expert_parallel_benchmark_traffic_and_timing(tmp_path):
    out = _run("expert_parallel.py", "--tokens", "64", "--procs", "2", "--steps", "2", "--repeats", "1",
               "--global-batch", "4", "--seq-len", "32", cwd=tmp_path)
    rows = out["traffic"]
    assert [r["topk_group"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["max_dest"] <= r["topk_group"]
        assert r["rows_remote"] <= r["copies_remote"]
        assert r["bytes_remote_bf16"] == pytest.approx(r["rows_remote"] * 1024 * 2)
    remote = [r["rows_remote"] for r in rows]
    assert remote == sorted(remote) and remote[0] < remote[-1]  # fewer groups per token, fewer bytes
    assert set(out["step_time_s"]) == {"single1", "ep2", "ddp2"} and all(v > 0 for v in out["step_time_s"].values())
