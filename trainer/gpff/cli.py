"""The ``gpff`` command line: ``gpff train sgdml|nbody``, ``gpff test``, ``gpff info``,
``gpff export-table``.

Each subcommand is a thin function over the Python API; errors are gpff exceptions, reported on
stderr by :func:`main` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

#: `gpff train nbody --time-budget`: the share of the budget the marginal-likelihood search may
#: start evaluations in, and the share of what is then left that the fit may take (the rest is
#: for the mapping and for the search's last evaluation, which may overrun its share)
OPTIMIZE_SHARE = 1.0 / 3.0
FIT_SHARE = 0.85
#: `gpff train nbody`: the force noise σ_F (energy unit/Å) the search starts from, and the value
#: kept with --no-optimize (mlearn, order 3 with the embedding term: it optimises to 0.018 for Li,
#: 0.19 for Mo, 0.12 for Si)
SIGMA_FORCE = 0.1


def _floats(text: str):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive(text: str) -> float:
    """One positive number (argparse type)."""
    values = _floats(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive number, got {text!r}")
    return values[0]


def _type_sigma_option(text: str):
    """``TYPE:SIGMA_E[:SIGMA_F]`` (argparse type) -> (TYPE, (σ_E or None, σ_F or None))."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected TYPE:SIGMA_E[:SIGMA_F], got {text!r}")
    sigmas = [None if not v.strip() else _positive(v) for v in parts[1:]] + [None]
    if sigmas[0] is None and sigmas[1] is None:
        raise argparse.ArgumentTypeError(f"no noise level in {text!r}")
    return parts[0], tuple(sigmas[:2])


def cmd_train_sgdml(args) -> dict:
    from .data import load_dataset, split_indices
    from .errors import DatasetError, GpffError, TrainingError
    from .sgdml import SOLVERS, train_sgdml  # noqa: F401

    if args.descriptor == "fchl19" and args.p is not None:
        raise GpffError("--p is the exponent of the inverse-distance descriptor; "
                        "--descriptor fchl19 has none")

    data = load_dataset(args.data, energy_unit=args.energy_unit)
    n_valid = args.n_valid if args.n_valid is not None else (
        0 if args.valid or not args.sigma_grid else min(200, data.n_frames // 5))
    if args.valid:
        valid = load_dataset(args.valid, energy_unit=args.energy_unit)
        n_train = args.n_train or data.n_frames
        (train_idx,) = split_indices(data.n_frames, [n_train], args.seed)
        valid = valid.subset(split_indices(valid.n_frames, [min(n_valid or valid.n_frames,
                                                              valid.n_frames)], args.seed + 1)[0])
    else:
        n_train = args.n_train or data.n_frames - n_valid
        train_idx, valid_idx = split_indices(data.n_frames, [n_train, n_valid], args.seed)
        valid = data.subset(valid_idx) if n_valid else None
    if n_train < 1:
        raise DatasetError(f"{args.data}: no training frames left ({data.n_frames} frames, "
                           f"{n_valid} for validation)")
    train = data.subset(train_idx)
    checkpoint = f"{args.output}.ckpt"
    if args.resume and not os.path.exists(checkpoint):
        raise TrainingError(f"{checkpoint}: no checkpoint to resume from")
    sigmas = args.sigma_grid or (None if args.sigma is None else [args.sigma])
    options = dict(lam=args.lam, use_sym=not args.no_sym,
                   use_energies=args.use_energies, solver=args.solver, max_memory=args.max_memory,
                   tol=args.tol, checkpoint=checkpoint, resume=args.resume, device=args.device,
                   descriptor=args.descriptor, progress=not args.quiet)
    for name in ("p", "kernel"):                # searched (with no σ given) unless set
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        model = train_sgdml(train, valid, sigmas=sigmas, **options)
    except KeyboardInterrupt:
        if os.path.exists(checkpoint):
            raise TrainingError(f"interrupted; the solver state is in {checkpoint}: rerun the same "
                                f"command with --resume") from None
        raise
    search = model.provenance.get("hyperparameter_search") or {}
    if args.descriptor == "auto" and search.get("descriptor") == "fchl19" and not args.quiet:
        rmse = {d: min((g["force_rmse"] for g in search["grid"] if g["descriptor"] == d),
                       default=float("nan")) for d in ("fchl19", "inverse_distance")}
        print(f"gpff: the hold-out chose the FCHL19 descriptor (force RMSE {rmse['fchl19']:.4g} "
              f"against {rmse['inverse_distance']:.4g} {data.energy_unit}/Å on the inverse "
              "distance); FCHL19 models take ~100x longer per force call in MD: "
              "--descriptor inverse_distance gives the fast model", file=sys.stderr)
    model.provenance["seed"] = args.seed
    model.save(args.output)
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)
    summary = {"model": os.fspath(args.output), "descriptor": model.descriptor,
               "sigma": model.sigma, "p": model.p if model.descriptor == "inverse_distance" else None,
               "kernel": model.kernel, "use_energies": model.use_energies, "n_train": model.n_train,
               "n_perms": len(model.perms), "energy_unit": model.energy_unit,
               "validation": model.provenance.get("validation"),
               "solver": model.provenance["solver"],
               "train_seconds": model.provenance["train_seconds"]}
    print(json.dumps(summary, indent=1))
    return summary


def cmd_train_nbody(args) -> dict:
    import time

    from .data import load_configurations, split_indices
    from .errors import DatasetError
    from .mapping import map_gp
    from .nbody import N_ENVS_MAX, NBodyGP, n_envs_within

    data = load_configurations(args.data, energy_unit=args.energy_unit)
    n = len(data.frames)
    n_train = min(args.n_train or n, n)
    if n_train < 1:
        raise DatasetError(f"{args.data}: no configurations to train on")
    train = data.subset(split_indices(n, [n_train], args.seed)[0])
    order = int(args.order)
    options = {k: v for k, v in dict(
        length_scale_2=args.length_scale_2, length_scale_3=args.length_scale_3,
        sigma_2=args.sigma_2, sigma_3=args.sigma_3, sigma_energy=args.sigma_energy,
        length_scale_embedding=args.length_scale_embedding, sigma_embedding=args.sigma_embedding,
        sigma_force=SIGMA_FORCE if args.sigma_force is None else args.sigma_force).items()
        if v is not None}
    model = NBodyGP(order=order, cutoff=args.cutoff, cutoff_3body=args.cutoff_3body,
                    cutoff_width=args.cutoff_width,
                    embedding=order == 3 if args.embedding is None else args.embedding,
                    density_decay=args.density_decay, device=args.device,
                    config_type_sigma=dict(args.config_type_sigma or ()),
                    progress=not args.quiet, **options)
    start = time.perf_counter()
    budget = 60.0 * args.time_budget
    n_envs, rule = args.n_envs, None
    if not args.no_optimize:
        given = [k for k in ("length_scale_2", "length_scale_3", "sigma_2", "sigma_3",
                             "length_scale_embedding", "sigma_embedding", "sigma_force")
                 if getattr(args, k) is not None]
        if not args.optimize_noise:
            given.append("sigma_energy")
        model.optimize(train, n_envs=args.n_envs_optimize, n_frames=args.n_frames_optimize,
                       seed=args.seed, fix=given,
                       time_limit=OPTIMIZE_SHARE * budget)
        if n_envs is None:
            left = FIT_SHARE * (budget - (time.perf_counter() - start))
            n_energies = n_train if train.energies is not None else 0
            n_envs = n_envs_within(left, model.provenance["optimization"], n_energies, N_ENVS_MAX)
            rule = {"time_budget_minutes": args.time_budget, "fit_seconds_allowed": round(left, 1),
                    "n_envs": n_envs, "n_envs_max": N_ENVS_MAX}
    model.fit(train, n_envs=N_ENVS_MAX if n_envs is None else n_envs, seed=args.seed)
    fit_seconds = time.perf_counter() - start
    check = [train.frames[k] for k in split_indices(n_train, [min(5, n_train)], args.seed + 1)[0]]
    mapped = map_gp(model, map_error=args.map_error, n_points=args.grid,
                    n_points_3body=args.grid_3body, check_frames=check)
    mapped.provenance = {"data": os.path.basename(data.path), "sha256": data.sha256,
                         "n_configurations": n_train, "n_atoms": int(train.n_atoms_total),
                         "n_envs": int(len(model.force_envs)), "n_envs_rule": rule,
                         "fixed_hyperparameters": (model.hyperparameter_names if args.no_optimize
                                                   else model.provenance["optimization"]["fixed"]),
                         "config_type_sigma": model.summary()["config_type_sigma"],
                         "seed": args.seed,
                         "train_seconds": round(fit_seconds, 1),
                         "total_seconds": round(time.perf_counter() - start, 1)}
    mapped.save(args.output)
    summary = {"model": os.fspath(args.output), "order": mapped.order, "species": mapped.species,
               "cutoff": mapped.cutoff, "cutoff_3body": mapped.cutoff_3body,
               "hyperparameters": mapped.hyperparameters, "mapping_error": mapped.mapping_error,
               **mapped.provenance}
    print(json.dumps(summary, indent=1))
    return summary


def cmd_export_table(args) -> dict:
    from .errors import ModelFileError
    from .modelfile import load
    from .table import write_pair_table

    model = load(args.model)
    if model.metadata.get("model") != "mff":
        raise ModelFileError(f"{args.model}: only mapped force fields (mff) have a 2-body table")
    output = args.output or os.path.splitext(os.fspath(args.model))[0] + ".table"
    keywords = write_pair_table(model, output, args.n_points, source=os.fspath(args.model))
    # the terms of the model that a pair table cannot hold
    omitted = (["3-body"] if model.order == 3 else []) + (
        ["embedding"] if model.embedding_tables else [])
    info = {"table": output, "keywords": keywords, "cutoff": model.cutoff,
            "energy_unit": model.energy_unit, "includes_3body": False, "omitted_terms": omitted}
    print(json.dumps(info))
    return info


def cmd_test(args) -> dict:
    from .modelfile import model_kind

    if model_kind(args.model) == "mff":
        from .data import load_configurations
        from .evaluate import evaluate_mff

        configs = load_configurations(args.data, energy_unit=args.energy_unit)
        if args.n:
            configs = configs.subset(np.arange(min(args.n, len(configs.frames))))
        res = evaluate_mff(args.model, configs, plot=args.plot)
        header, per = f"{res['n_frames']} configurations ({res['n_atoms']} atoms)", "/atom"
    else:
        from .data import load_dataset
        from .evaluate import evaluate_model

        data = load_dataset(args.data, energy_unit=args.energy_unit)
        if args.n:
            data = data.subset(np.arange(min(args.n, data.n_frames)))
        res = evaluate_model(args.model, data, plot=args.plot)
        header, per = f"{res['n_frames']} frames", ""
    if args.json:
        print(json.dumps(res))
        return res
    eu = res["energy_unit"]
    print(f"{header} of {res['data']}")
    if res["energy_mae"] is not None:
        print(f"energy MAE {res['energy_mae']:.5g} {eu}{per}   RMSE {res['energy_rmse']:.5g} {eu}{per}")
    if res["force_mae"] is not None:
        print(f"force  MAE {res['force_mae']:.5g} {eu}/Å   RMSE {res['force_rmse']:.5g} {eu}/Å")
    return res


def cmd_info(args) -> dict:
    from .modelfile import read_model_file

    meta, tensors = read_model_file(args.model)
    info = {k: v for k, v in meta.items() if k != "provenance"}
    info["file"] = os.fspath(args.model)
    info["perms"] = tensors["perms"].tolist() if "perms" in tensors else None
    prov = dict(meta.get("provenance", {}))
    prov.pop("train_indices", None)
    info["provenance"] = prov
    if args.json:
        print(json.dumps(info))
    else:
        for key in ("file", "model", "format_version", "gpff_version", "n_atoms", "species",
                    "n_perms", "kernel", "descriptor", "descriptor_exponent", "sigma", "lam",
                    "units", "n_train", "molecule_extent", "order", "cutoff", "cutoff_3body",
                    "cutoff_width", "embedding", "energy_offsets", "hyperparameters",
                    "mapping_error"):
            if key in info:
                print(f"{key:16s} {info[key]}")
        fchl19 = {k[len("fchl19_"):]: v for k, v in info.items() if k.startswith("fchl19_")}
        if fchl19:
            print(f"{'fchl19':16s} {fchl19}")
        for key, value in prov.items():
            if key == "hyperparameter_search":     # the full history is in --json
                scaled = ("" if "sigma_validated" not in value else
                          f" ({value['sigma_validated']:.4g} at {value['n_grad']} frames, scaled "
                          f"to {value['n_target']})")
                value = (f"{value.get('kernel', 'matern52')}, σ {value['sigma']:.4g}{scaled}"
                         + ("" if value.get("p") is None else f", p {value['p']:.4g}")
                         + f" from {len(value['grid'])} grid points and "
                         f"{len(value['gradient'])} gradient steps on "
                         f"{value['n_sub']}/{value['n_valid']} hold-out frames")
            print(f"{'provenance.' + key:16s} {value}")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpff", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
    kinds = train.add_subparsers(dest="kind", required=True)
    sg = kinds.add_parser("sgdml", help="symmetric GDML model of one molecule")
    sg.add_argument("data", help="rMD17 npz, sGDML npz, or any ASE file with energies and forces")
    sg.add_argument("-o", "--output", required=True, help="model file to write (.gpff)")
    sg.add_argument("--n-train", type=int, help="training frames (default: all not used for validation)")
    sg.add_argument("--n-valid", type=int, help="validation frames (default 0; 1/5 up to 200 with --sigma-grid)")
    sg.add_argument("--valid", help="draw validation frames from this file instead")
    grp = sg.add_mutually_exclusive_group()
    grp.add_argument("--sigma", type=float, help="kernel length scale σ (default: searched, with p, "
                     "by hold-out validation on the training frames)")
    grp.add_argument("--sigma-grid", type=_floats, help="comma-separated σ values, chosen by validation force MAE")
    sg.add_argument("--descriptor", choices=["auto", "inverse_distance", "fchl19"], default="auto",
                    help="inverse_distance: sGDML's 1/r^p; fchl19: the global FCHL19 descriptor "
                    "(papers/ad_kernels.txt Table 1); auto (default): the search picks the one "
                    "with the lower hold-out error (FCHL19 only where it fits the memory budget), "
                    "the inverse distance when --sigma or --sigma-grid is given")
    sg.add_argument("--p", type=float, help="descriptor exponent p of 1/r^p (default 1, or searched)")
    sg.add_argument("--kernel", choices=["matern52", "rbf"],
                    help="kernel (default: chosen by the search, with σ and p; matern52, sgdml's, "
                    "when --sigma or --sigma-grid is given)")
    sg.add_argument("--no-energies", dest="use_energies", action="store_false", default=None,
                    help="train on forces only (default: energies too, when the data has them)")
    sg.add_argument("--lam", type=float, help="regularisation λ (default: chosen by the search "
                    "among 1e-10 to 1e-6; sgdml's 1e-10 when --sigma or --sigma-grid is given)")
    sg.add_argument("--solver", choices=["auto", "cholesky", "cg"], default="auto",
                    help="auto: Cholesky when the kernel fits --max-memory, else preconditioned CG")
    sg.add_argument("--max-memory", type=float, help="memory budget in GB (default 80%% of RAM)")
    sg.add_argument("--tol", type=float, default=1e-4, help="CG relative residual (default 1e-4)")
    sg.add_argument("--resume", action="store_true", help="continue an interrupted CG solve from OUTPUT.ckpt")
    sg.add_argument("--no-sym", action="store_true", help="plain GDML: no permutational symmetries")
    sg.add_argument("--seed", type=int, default=0, help="seed of the frame selection")
    sg.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    sg.add_argument("--energy-unit", help="override the dataset's energy unit")
    sg.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sg.set_defaults(func=cmd_train_sgdml)

    nb = kinds.add_parser("nbody", help="local 2-/3-body GP mapped onto splines (MFF)")
    nb.add_argument("data", help="any ASE file (extxyz, ...) with energies and/or forces, eV and Å")
    nb.add_argument("-o", "--output", required=True, help="model file to write (.gpff)")
    nb.add_argument("--order", choices=["2", "3"], default="3",
                    help="2: 2-body; 3: 2-body + 3-body (default)")
    nb.add_argument("--cutoff", type=float, default=5.0, help="2-body cutoff r_c, Å (default 5)")
    nb.add_argument("--cutoff-3body", type=float, default=4.2,
                    help="3-body cutoff r_c3, Å (default 4.2: the second neighbour shell of bcc metals "
                    "inside at nearly full weight; the test force MAE on mlearn Li drops from 0.018 "
                    "to 0.014 eV/Å against 3.6 Å; covalent Si gains up to 4.6 Å, which has "
                    "~3x the triplets of 4.2 Å)")
    nb.add_argument("--cutoff-width", type=float, default=1.0,
                    help="width d of the smooth cutoff function, Å (default 1)")
    nb.add_argument("--embedding", action=argparse.BooleanOptionalAction, default=None,
                    help="the EAM-like many-body term F(ρ_i) of the density ρ_i = Σ_j "
                    "f_c(r_ij) exp(-β r_ij) within --cutoff, mapped onto a 1-D spline (default: "
                    "on with --order 3, off with --order 2; on the mlearn Si, Mo, Li test sets it "
                    "cuts the force MAE by 16-34 %% and the energy MAE 2-2.7x)")
    nb.add_argument("--density-decay", type=float, default=1.0,
                    help="β of the embedding density, 1/Å (default 1; 0.5 suits mlearn Li, see "
                    "--sigma-energy)")
    nb.add_argument("--n-train", type=int, help="training configurations (default all)")
    nb.add_argument("--n-envs", type=int,
                    help="force environments (atoms, drawn at random) used in training (default: "
                    "as many as the fit is estimated to take within --time-budget, at most 2000)")
    nb.add_argument("--time-budget", type=_positive, default=25.0,
                    help="minutes for the whole training (default 25): the marginal-likelihood "
                    "search stops after a third of it, and the default --n-envs is chosen for the "
                    "rest")
    nb.add_argument("--n-envs-optimize", type=int, default=200,
                    help="force environments used by the marginal-likelihood optimisation (default 200)")
    nb.add_argument("--n-frames-optimize", type=int, default=50,
                    help="configurations (random) whose energies and force environments the "
                    "marginal-likelihood optimisation uses (default 50)")
    nb.add_argument("--length-scale-2", type=float, help="ℓ₂, Å (default: optimised)")
    nb.add_argument("--length-scale-3", type=float, help="ℓ₃, Å (default: optimised)")
    nb.add_argument("--sigma-2", type=float, help="2-body signal σ₂ (default: optimised)")
    nb.add_argument("--sigma-3", type=float, help="3-body signal σ₃ (default: optimised)")
    nb.add_argument("--length-scale-embedding", type=float,
                    help="ℓ_ρ of the embedding kernel, units of ρ (default: optimised)")
    nb.add_argument("--sigma-embedding", type=float,
                    help="signal σ_ρ of the embedding kernel (default: optimised)")
    nb.add_argument("--sigma-energy", type=float, default=0.005,
                    help="energy noise per atom, energy unit (default 0.005; the regularisation of "
                    "the energies, as GAP's default_sigma). Smaller fits the energies closer where "
                    "the model can: mlearn Li, 0.0003 with --density-decay 0.5 --cutoff 6.5, test "
                    "energy MAE 0.73 against 2.58 meV/atom, force MAE 0.014 eV/Å either way; on Si "
                    "and Mo, 0.001 with --density-decay 0.5 raises the force MAE by 49 and 12 %% "
                    "(surfaces; docs/mff.md)")
    nb.add_argument("--sigma-force", type=float,
                    help="force noise per component, energy unit/Å (default: optimised, from 0.1; "
                    "0.1 with --no-optimize)")
    nb.add_argument("--config-type-sigma", type=_type_sigma_option, action="append",
                    metavar="TYPE:SIGMA_E[:SIGMA_F]",
                    help="noise of the frames whose info['config_type'] is TYPE (GAP's "
                    "config_type_sigma): energy per atom and, optionally, force (empty: the "
                    "global value); fixed, not optimised; repeatable. E.g. Elastic:0.001 fits "
                    "the strained crystals (lattice constant, elastic moduli) to 1 meV/atom")
    nb.add_argument("--optimize-noise", action="store_true",
                    help="also optimise --sigma-energy by marginal likelihood (often trades the "
                    "energies away: σ_E grows to tens of meV/atom)")
    nb.add_argument("--no-optimize", action="store_true",
                    help="keep the given/default hyperparameters (no marginal-likelihood optimisation)")
    nb.add_argument("--map-error", type=float, default=1e-4,
                    help="target mapping error: largest table-gradient error, energy/Å (default 1e-4)")
    nb.add_argument("--grid", type=int, help="fixed 2-body grid points (instead of --map-error)")
    nb.add_argument("--grid-3body", type=int, help="fixed 3-body grid points per r_ij axis")
    nb.add_argument("--seed", type=int, default=0, help="seed of the selections")
    nb.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    nb.add_argument("--energy-unit", help="override the dataset's energy unit")
    nb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    nb.set_defaults(func=cmd_train_nbody)

    export = sub.add_parser("export-table", help="write the 2-body part of an mff model as a "
                            "LAMMPS pair_style table file")
    export.add_argument("model")
    export.add_argument("-o", "--output", help="table file (default MODEL.table)")
    export.add_argument("--n-points", type=int, help="points per pair (default: the model's grid)")
    export.set_defaults(func=cmd_export_table)

    test = sub.add_parser("test", help="errors of a model on a dataset (through the C++ core)")
    test.add_argument("model")
    test.add_argument("data")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument("--plot", help="write a parity plot (png, pdf, svg)")
    test.add_argument("--n", type=int, help="use the first N frames only")
    test.add_argument("--energy-unit", help="override the dataset's energy unit")
    test.set_defaults(func=cmd_test)

    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    from .errors import GpffError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GpffError as err:
        print(f"gpff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpff: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
