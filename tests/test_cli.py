"""The gpff command line: train sgdml, test, info; errors go to stderr with exit status 2."""

import json

import numpy as np
import pytest

from gpff.cli import main
from gpff.hyperopt import FCHL19_SIGMAS, LAMBDAS

from conftest import ETHANOL_TEST, ETHANOL_TRAIN


def test_train_test_info(tmp_path, capsys):
    model = tmp_path / "eth.gpff"
    assert main(["train", "sgdml", str(ETHANOL_TRAIN), "-o", str(model), "--n-train", "40",
                 "--n-valid", "20", "--sigma-grid", "5,20", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "sgdml" and info["n_atoms"] == 9 and info["n_train"] == 40
    assert info["species"] == ["C", "C", "O", "H", "H", "H", "H", "H", "H"]
    assert info["units"] == {"energy": "kcal/mol", "length": "Angstrom"}
    assert [g["sigma"] for g in info["provenance"]["sigma_grid"]] == [5.0, 20.0]
    best = min(info["provenance"]["sigma_grid"], key=lambda g: g["force_mae"])
    assert info["sigma"] == best["sigma"]
    assert len(info["perms"]) == info["n_perms"]

    plot = tmp_path / "parity.png"
    assert main(["test", str(model), str(ETHANOL_TEST), "--n", "50", "--json", "--plot", str(plot)]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("n_frames", "energy_mae", "energy_rmse", "force_mae", "force_rmse",
                "energy_unit", "length_unit"):
        assert key in res
    assert res["n_frames"] == 50 and res["energy_unit"] == "kcal/mol"
    assert 0 < res["force_mae"] < res["force_rmse"] < 10
    assert plot.stat().st_size > 1000


def test_test_uses_model_units(tmp_path, capsys, ethanol_model_path):
    """An eV dataset is converted to the model's kcal/mol before the errors are computed."""
    assert main(["test", ethanol_model_path, str(ETHANOL_TEST), "--n", "20", "--json"]) == 0
    kcal = json.loads(capsys.readouterr().out)
    assert main(["test", ethanol_model_path, str(ETHANOL_TEST), "--n", "20", "--json",
                 "--energy-unit", "eV"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["energy_unit"] == "kcal/mol"
    assert ev["force_mae"] != pytest.approx(kcal["force_mae"])


@pytest.mark.parametrize("argv, message", [
    (["test", "missing.gpff", str(ETHANOL_TEST)], "missing.gpff: no such model file"),
    (["train", "sgdml", "missing.npz", "-o", "x.gpff"], "missing.npz: no such file"),
    (["train", "sgdml", str(ETHANOL_TRAIN), "-o", "x.gpff", "--n-train", "10",
      "--sigma-grid", "5,10", "--n-valid", "0"], "σ grid needs validation frames"),
])
def test_errors_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gpff").exists()


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "5,10"])
def test_time_budget_must_be_one_positive_number(tmp_path, capsys, budget):
    with pytest.raises(SystemExit) as exc:
        main(["train", "nbody", "si.extxyz", "-o", str(tmp_path / "x.gpff"), "--time-budget", budget])
    assert exc.value.code == 2
    assert "--time-budget" in capsys.readouterr().err
    assert not (tmp_path / "x.gpff").exists()


@pytest.mark.parametrize("spec", ["Elastic", "Elastic:0", ":0.1", "Elastic::", "Elastic:x",
                                  "Elastic:0.1:0.2:0.3"])
def test_config_type_sigma_syntax(tmp_path, capsys, spec):
    with pytest.raises(SystemExit) as exc:
        main(["train", "nbody", "si.extxyz", "-o", str(tmp_path / "x.gpff"),
              "--config-type-sigma", spec])
    assert exc.value.code == 2
    assert "--config-type-sigma" in capsys.readouterr().err
    assert not (tmp_path / "x.gpff").exists()


def test_species_mismatch(tmp_path, capsys, ethanol_model_path):
    with np.load(ETHANOL_TEST) as d:
        arrays = {k: d[k][:5] if k != "nuclear_charges" else d[k][::-1] for k in
                  ("nuclear_charges", "coords", "energies", "forces")}
    np.savez(tmp_path / "rev.npz", **arrays)
    assert main(["test", ethanol_model_path, str(tmp_path / "rev.npz")]) == 2
    assert "do not match the model" in capsys.readouterr().err


def test_validation_file(tmp_path, capsys):
    """--valid draws the validation frames from another file; σ is chosen on them."""
    with np.load(ETHANOL_TRAIN) as d:
        np.savez(tmp_path / "valid.npz", **{k: d[k][900:] if k != "nuclear_charges" else d[k]
                                            for k in ("nuclear_charges", "coords", "energies", "forces")})
    model = tmp_path / "m.gpff"
    assert main(["train", "sgdml", str(ETHANOL_TRAIN), "-o", str(model), "--n-train", "30",
                 "--valid", str(tmp_path / "valid.npz"), "--n-valid", "40",
                 "--sigma-grid", "3,10", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation"]["n_frames"] == 40 and summary["validation"]["file"] == "valid.npz"
    assert summary["sigma"] in (3.0, 10.0)


def test_default_search_and_energies(tmp_path, capsys):
    """No σ given: kernel, σ and p are searched on hold-out training frames, energies are trained on."""
    model = tmp_path / "d.gpff"
    assert main(["train", "sgdml", str(ETHANOL_TRAIN), "-o", str(model), "--n-train", "60",
                 "--descriptor", "inverse_distance", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["use_energies"] is True and summary["solver"]["solver"] == "cholesky"
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    search = info["provenance"]["hyperparameter_search"]
    assert (search["n_sub"], search["n_valid"]) == (30, 30)
    assert {g["kernel"] for g in search["grid"]} == {"rbf", "matern52"} and len(search["grid"]) == 18
    grid_best = min(search["grid"], key=lambda g: g["force_rmse"])
    assert info["kernel"] == search["kernel"] == grid_best["kernel"]
    assert (search["gradient"][0]["sigma"], search["gradient"][0]["p"]) == pytest.approx((grid_best["sigma"], grid_best["p"]))
    assert info["sigma"] == pytest.approx(search["sigma"]) and info["descriptor_exponent"] == pytest.approx(search["p"])
    best = min(search["gradient"], key=lambda g: g["force_rmse"])
    assert best["sigma"] == pytest.approx(search["sigma_validated"])
    assert search["sigma"] == pytest.approx(best["sigma"] * (60 / search["n_grad"]) ** (-1 / 3))
    # λ: the scan's best, at σ scaled to the 30 hold-out training frames, is the model's
    scan = search["lambda_scan"]
    assert [g["lam"] for g in scan] == list(LAMBDAS)
    assert all(g["sigma"] == pytest.approx(best["sigma"] * (30 / search["n_grad"]) ** (-1 / 3)) for g in scan)
    assert info["lam"] == search["lam"] == min(scan, key=lambda g: g["force_rmse"])["lam"]
    assert not (tmp_path / "d.gpff.ckpt").exists()


def test_fchl19_descriptor(tmp_path, capsys):
    """--descriptor fchl19: σ (and kernel, λ) searched without p, written, shown, tested by the core."""
    model = tmp_path / "f.gpff"
    assert main(["train", "sgdml", str(ETHANOL_TRAIN), "-o", str(model), "--n-train", "40",
                 "--descriptor", "fchl19", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["descriptor"] == "fchl19" and summary["p"] is None
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["descriptor"] == "fchl19" and info["fchl19_n_rs2"] == 24
    assert "descriptor_exponent" not in info
    search = info["provenance"]["hyperparameter_search"]
    assert search["p"] is None and len(search["grid"]) == 2 * len(FCHL19_SIGMAS)
    assert all(g["p"] is None for g in search["grid"] + search["gradient"])
    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert "fchl19" in text and "three_body_weight" in text and ", p " not in text
    assert main(["test", str(model), str(ETHANOL_TEST), "--n", "20", "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["force_mae"] < 10
    assert main(["train", "sgdml", str(ETHANOL_TRAIN), "-o", str(tmp_path / "p.gpff"),
                 "--descriptor", "fchl19", "--p", "0.5"]) == 2
    assert "--descriptor fchl19 has none" in capsys.readouterr().err
    assert not (tmp_path / "p.gpff").exists()


def test_train_nbody_test_info_export(tmp_path, capsys):
    """gpff train nbody -> test (C++ core, per-atom energy errors) -> info -> export-table."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    from conftest import ROOT

    frames = read(ROOT / "data/mlearn/mlearn_Si_train.extxyz", ":")
    data = tmp_path / "si.extxyz"
    write(data, [a for a in frames if len(a) <= 24][:6])
    model = tmp_path / "si.gpff"
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2", "--n-envs", "20",
                 "--no-optimize", "--length-scale-2", "0.8", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_envs"] == 20 and summary["order"] == 2
    assert summary["mapping_error"]["force_mae_vs_exact"] < 1e-4
    assert main(["test", str(model), str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_frames"] == 6 and res["energy_unit"] == "eV"
    assert 0 <= res["energy_mae"] < 0.05 and 0 < res["force_mae"] < 1.0
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "mff" and info["species"] == ["Si"] and info["cutoff"] == 5.0
    assert info["provenance"]["n_envs"] == 20
    assert main(["export-table", str(model), "-o", str(tmp_path / "si.table")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keywords"] == ["Si_Si"] and out["omitted_terms"] == []
    # the default --n-envs: what the budget allows after the search, here nothing beyond the
    # search's own 10 environments (the floor); the search itself stopped at its time limit
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2", "--time-budget",
                 "1e-6", "--n-envs-optimize", "10", "--n-frames-optimize", "3", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_envs"] == 10 and summary["n_envs_rule"]["n_envs"] == 10
    assert summary["n_envs_rule"]["time_budget_minutes"] == 1e-6
    # the search optimises σ_F unless it is given; σ_E stays fixed unless --optimize-noise
    fast = ["--n-envs", "10", "--n-envs-optimize", "10", "--n-frames-optimize", "3", "-q"]
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2", *fast]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fixed_hyperparameters"] == ["sigma_energy"]
    assert summary["hyperparameters"]["sigma_force"] != pytest.approx(0.1)
    assert summary["hyperparameters"]["sigma_energy"] == pytest.approx(0.005)
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2", "--sigma-force",
                 "0.2", "--optimize-noise", *fast]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fixed_hyperparameters"] == ["sigma_force"]
    assert summary["hyperparameters"]["sigma_force"] == pytest.approx(0.2)
    assert summary["hyperparameters"]["sigma_energy"] != pytest.approx(0.005)
    # noise by config type (GAP's config_type_sigma), recorded in the model; a type the data
    # lacks is refused
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2",
                 "--config-type-sigma", "Surface:0.001:", *fast]) == 0
    assert json.loads(capsys.readouterr().out)["config_type_sigma"] == {"Surface": [0.001, None]}
    assert main(["info", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["config_type_sigma"] == {
        "Surface": [0.001, None]}
    assert main(["train", "nbody", str(data), "-o", str(tmp_path / "no.gpff"), "--order", "2",
                 "--config-type-sigma", "Elastic::0.01", *fast]) == 2
    assert "['Elastic'] that no frame has" in capsys.readouterr().err
    assert not (tmp_path / "no.gpff").exists()
    # the embedding term: optimised ℓ_ρ, σ_ρ; mapped onto a 1-D table the core evaluates
    assert main(["train", "nbody", str(data), "-o", str(model), "--order", "2", "--embedding",
                 "--density-decay", "1.5", *fast]) == 0
    summary = json.loads(capsys.readouterr().out)
    hp = summary["hyperparameters"]
    assert hp["length_scale_embedding"] != pytest.approx(0.1) and hp["sigma_embedding"] > 0
    assert summary["mapping_error"]["embedding"]["Si"]["max_gradient_error"] < 1e-4
    assert summary["mapping_error"]["force_mae_vs_exact"] < 1e-4
    assert main(["info", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["embedding"]["density_decay"] == 1.5
    assert main(["test", str(model), str(data), "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["force_mae"] < 1.0
    assert main(["export-table", str(model), "-o", str(tmp_path / "e.table")]) == 0
    assert json.loads(capsys.readouterr().out)["omitted_terms"] == ["embedding"]
    water = tmp_path / "h2o.extxyz"
    h2o = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    h2o.calc = SinglePointCalculator(h2o, energy=0.0, forces=np.zeros((3, 3)))
    write(water, h2o)
    assert main(["test", str(model), str(water)]) == 2
    assert "H, O" in capsys.readouterr().err
