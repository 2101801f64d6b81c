"""SpectralNewton on 2-D meshes, 4 gloo processes (workers in tests/dist_2d.py): FSDP2 over tensor parallel
(torchtitan's layout: Shard(0), Shard(1) and _StridedShard weights) and HSDP (replicate x shard)."""

from __future__ import annotations

import pytest
from dist_2d import worker
from dist_helpers import run_workers

TOL = 1e-9  # float64


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_workers(worker, 4, str(tmp_path_factory.mktemp("ckpt2d")), timeout=600, pg_timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_fsdp", "hsdp"])
def test_equal_to_one_process(res, layout):
    r = res[0][layout]
    err, where = r["err"]
    assert err < TOL, f"{layout}: {where} off by {err:.2e}"


@pytest.mark.slow
def test_layouts_are_really_two_dimensional(res):
    tp = res[0]["tp_fsdp"]["placements"]
    assert "_StridedShard" in tp["block.q.weight"] or "_S(" in tp["block.q.weight"], tp["block.q.weight"]
    assert "Shard(dim=1)" in tp["block.o.weight"], tp["block.o.weight"]
    assert "Replicate" in res[0]["hsdp"]["placements"]["block.up.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_fsdp", "hsdp"])
def test_dcp_resume_is_exact_on_the_same_mesh_and_reshards(res, layout):
    r = res[0][layout]
    err, where = r["resume_err"]
    assert err < TOL, f"{layout} resume: {where} off by {err:.2e}"
    err, where = r["reshard_err"]
    assert err < TOL, f"{layout} -> 1-D FSDP resume: {where} off by {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_fsdp", "hsdp"])
def test_bytes_sent_are_the_ideal(res, layout):
    """Each rank sends exactly: its pieces of the matrices others own, once (gather), and every holder's pieces
    of the matrices it owns, once (scatter), plus 3 numbers of status per matrix and the tracked bases."""
    for rank, r in enumerate(res):
        b = r[layout]["bytes"]
        assert b["distinct_sources"]
        assert sum(b["sent"]) == b["ideal"] + b["headers"] + b["bases"], (rank, b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_fsdp", "hsdp"])
def test_sketches_of_2d_sharded_gradients_are_exact(res, layout):
    """The trajectory sketches read the same layouts: per-rank sketches of the local pieces sum to the sketch
    of the whole gradient (replicated pieces counted once)."""
    for r in res:
        assert r[layout]["sketch_err"] < 1e-5, r[layout]["sketch_err"]  # the sketch sums in float32


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_fsdp", "hsdp"])
def test_probes_refuse_2d_meshes_with_a_clear_error(res, layout):
    msg = res[0][layout]["probe_error"]
    assert msg is not None and ("mesh" in msg or "rows" in msg), msg
