"""``spectral-dist probe``: table, CSV/JSON and plots from a built-in model and from checkpoints (state dicts as
.pt or .safetensors; a pickled module only with --trust-checkpoint)."""

import csv
import json

import pytest
import torch

from spectral_dist.cli import main
from spectral_dist.commands.probe import build


def test_probe_cli_builtin_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "a"
    assert (
        main(["probe", "--model", "mlp", "--top_k", "4", "--batch_size", "8", "--output_dir", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "| 0.weight |" in text and "gradient-equivalents" in text
    for f in ("probe.csv", "probe.json", "curvature_loglog.png", "transfer.png"):
        assert (out / f).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert [r["layer"] for r in rows] == ["0.weight", "2.weight", "4.weight"]
    d = json.loads((out / "probe.json").read_text())
    assert d["cost"]["hvps"] == 3 * 4 and len(d["layers"]["2.weight"]["h"]) == 4

    # a state dict for the same architecture, with different weights, gives different curvature
    model, _, _ = build("mlp", 8, seed=7, dtype=torch.float64)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    out2 = tmp_path / "b"
    args = ["probe", "--model", "mlp", "--checkpoint", str(tmp_path / "sd.pt"), "--top_k", "4"]
    assert main(args + ["--batch_size", "8", "--output_dir", str(out2), "--no_plots"]) == 0
    d2 = json.loads((out2 / "probe.json").read_text())
    assert d2["layers"]["2.weight"]["h"] != d["layers"]["2.weight"]["h"]
    with pytest.raises(ValueError, match="--model"):
        main(["probe", "--checkpoint", str(tmp_path / "sd.pt"), "--output_dir", str(out2)])


def test_probe_cli_checkpoint_formats(tmp_path):
    """A state dict as safetensors, as a weights-only .pt, under a "model" key, and a pickled whole module
    (only with --trust-checkpoint) all give the same curvature as the model they hold."""
    from safetensors.torch import save_file

    model, _, _ = build("mlp", 8, seed=7, dtype=torch.float64)
    sd = model.state_dict()
    save_file(sd, tmp_path / "sd.safetensors")
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({"model": sd, "step": 3}, tmp_path / "wrapped.pt")
    torch.save(model, tmp_path / "module.pt")
    base = ["probe", "--model", "mlp", "--top_k", "3", "--batch_size", "8", "--no_plots"]

    def h(name, *extra):
        out = tmp_path / f"out_{name}"
        assert main([*base, "--checkpoint", str(tmp_path / name), "--output_dir", str(out), *extra]) == 0
        return json.loads((out / "probe.json").read_text())["layers"]["2.weight"]["h"]

    want = h("sd.pt")
    assert h("sd.safetensors") == want and h("wrapped.pt") == want
    with pytest.raises(ValueError, match="refused.*Sequential.*--trust-checkpoint"):
        h("module.pt")
    assert h("module.pt", "--trust-checkpoint") == want
    assert h("module.pt", "--trust_checkpoint") == want
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 4)
    with pytest.raises(ValueError, match="could not read it"):
        h("junk.pt")


def test_probe_cli_eigen_definition(tmp_path, capsys):
    """--h eigen: h_k are the layer block's top eigenvalues (descending), with overlaps in [0, 1]."""
    out = tmp_path / "e"
    args = ["probe", "--model", "mlp", "--top_k", "3", "--batch_size", "8", "--h", "eigen", "--no_plots"]
    assert main(args + ["--output_dir", str(out)]) == 0
    d = json.loads((out / "probe.json").read_text())
    assert d["h"] == "eigen"
    for lay in d["layers"].values():
        h = lay["h"]
        assert h == sorted(h, reverse=True)
        assert all(0.0 <= o <= 1.0 + 1e-9 for o in lay["overlap"])
    # the top eigenvalue bounds every Rayleigh quotient along u_k v_k^T from above
    out_r = tmp_path / "r"
    assert main(args[:-3] + ["--no_plots", "--output_dir", str(out_r)]) == 0
    r = json.loads((out_r / "probe.json").read_text())
    for name, lay in d["layers"].items():
        assert max(r["layers"][name]["h"]) <= lay["h"][0] * (1 + 1e-9) + 1e-12
