"""Contracts on 2 gloo processes: schedules after load_state_dict, rank-agreed skips, errors raised everywhere,
single-rank optimizers that never hang (workers in tests/dist_contracts.py)."""

from __future__ import annotations

import pytest
from dist_contracts import contracts_worker
from dist_helpers import run_workers

TOL = 1e-5


@pytest.fixture(scope="module")
def res():
    return run_workers(contracts_worker, 2, timeout=400, pg_timeout=60)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_lr_schedule_after_load_state_dict_equals_one_process(res, mode):
    err, where = res[0][f"schedule_{mode}"]
    assert err < TOL, f"{mode}: {where} off by {err:.2e}"


@pytest.mark.parametrize(
    "key", ["inf_fsdp2_norm.weight", "inf_fsdp2_fc1.weight", "inf_ddp_fc2.weight", "inf_ddp_norm.bias"]
)
def test_inf_on_one_rank_skips_everywhere(res, key):
    """An Inf in one rank's shard (FSDP2) or one rank's copy (DDP) skips the parameter's step on every rank:
    same counters everywhere, parameters equal to one process that skipped the same step."""
    r0 = res[0][key]
    err, where = r0["err"]
    assert err < TOL, f"{key}: {where} off by {err:.2e}"
    for r in res:
        assert r[key]["skipped"] == [1, 1], r[key]
        assert r[key]["same_stats"]


def test_owner_error_is_raised_on_every_rank(res):
    for rank, r in enumerate(res):
        e = r["owner_error"]
        assert e["errors"][:2] == [None, None], e  # first failures: the step is skipped on every rank
        assert e["errors"][2] is not None and "DecompositionError" in e["errors"][2], (rank, e)
        assert e["counters"]["decomposition_failures"] == 3
    assert res[0]["owner_error"]["counters"] == res[1]["owner_error"]["counters"]


def test_one_rank_optimizer_never_hangs(res):
    assert res[0]["one_rank"] == "LocalEngine"
    assert all(r["group_ok"] for r in res)
