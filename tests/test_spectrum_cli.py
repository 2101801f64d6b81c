"""`spectral-dist spectrum`: JSON and PNG outputs on the built-in tiny models."""

import json

import pytest
import torch

from spectral_dist.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_spectrum_command_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "mlp"
    rc = main(
        [
            "spectrum",
            "--model",
            "mlp",
            "--top_k",
            "4",
            "--layers",
            "0",
            "4.weight",
            "--density",
            "--density_probes",
            "2",
        ]
        + ["--density_steps", "12", "--trace_matvecs", "12", "--output_dir", str(out)]
    )
    assert rc == 0
    for f in ("spectrum.json", "eigenvalues.png", "density.png"):
        assert (out / f).stat().st_size > 1000, f
    d = json.loads((out / "spectrum.json").read_text())
    assert set(d["layers"]) == {"0.weight", "4.weight"}
    for b in [*d["layers"].values(), d["model"]]:
        assert len(b["eigenvalues"]) == 4 and b["eigenvalues"] == sorted(b["eigenvalues"], reverse=True)
        assert max(b["relative_residuals"]) <= 1e-3 and b["trace"] is not None
        assert (
            abs(sum(b["density"]["values"]) * (b["density"]["grid"][1] - b["density"]["grid"][0]) - 1) < 1e-2
        )
    assert d["num_hvps"] == sum(b["num_hvps"] for b in [*d["layers"].values(), d["model"]])
    assert "HVPs in" in capsys.readouterr().out


def test_spectrum_command_on_gpt_layers(tmp_path):
    out = tmp_path / "gpt"
    rc = main(
        ["spectrum", "--model", "gpt", "--top_k", "2", "--layers", "transformer.h.0.attn.c_attn"]
        + ["--no_model", "--no_trace", "--batch_size", "2", "--output_dir", str(out)]
    )
    assert rc == 0
    d = json.loads((out / "spectrum.json").read_text())
    assert list(d["layers"]) == ["transformer.h.0.attn.c_attn.weight"] and d["model"] is None
    assert (out / "eigenvalues.png").exists() and not (out / "density.png").exists()


def test_spectrum_command_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        main(["spectrum", "--top_k", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["spectrum", "--model", "resnet50"])
