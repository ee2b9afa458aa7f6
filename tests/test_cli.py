"""Command-line and YAML flags -> config objects (nothing is compressed here)."""

from __future__ import annotations


import pytest

from jobs.cli import build_parser, compress_config, main, paper_tables_config
from pipeline.methods import SolverOptions
from pipeline.paper_tables import PaperTablesConfig
from sigma_core import RankRule


def _compress(*flags: str):
    return compress_config(build_parser().parse_args(["compress", *flags]))


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_compress_defaults_are_unchanged():
    config = _compress()
    assert config.solver == SolverOptions(max_iter=100, tol=1e-4)
    assert config.solver.cp_init == "svd" and config.solver.seed == 0
    assert config.linear_method is None and config.svd_rank is None and not config.compress_last_linear
    assert config.rules() == [(RankRule(alpha=0.8), 0.8)]


def test_cp_init_and_solver_seed():
    config = _compress("--methods", "cp-als,cp-als-sigma", "--cp-init", "random", "--solver-seed", "3")
    assert config.solver.cp_init == "random" and config.solver.seed == 3
    assert config.solver.cp_config().init == "random"
    demo = compress_config(build_parser().parse_args(["demo", "--cp-init", "random"]))
    assert demo.solver.cp_init == "random"


def test_hybrid_linear_method_and_svd_rank():
    config = _compress("--methods", "tucker2-als-sigma", "--linear-method", "svd-sigma", "--svd-rank", "16",
                       "--compress-last-linear")
    assert config.linear_method == "svd-sigma" and config.svd_rank == 16 and config.compress_last_linear
    (rule, alpha), = config.rules()
    assert rule == RankRule(alpha=0.8) and alpha == 0.8
    assert config.layer_rule("svd-sigma", rule) == RankRule(svd_rank=16)  # linears: the SVD rank
    assert config.layer_rule("tucker2-als-sigma", rule) == rule  # convs: alpha
    svd_only = _compress("--methods", "svd,svd-sigma", "--svd-rank", "4")
    assert svd_only.rules() == [(RankRule(svd_rank=4), None)]
    # Explicit Tucker-2 ranks say nothing about the SVD layers.
    with pytest.raises(ValueError, match="svd_rank"):
        _compress("--linear-method", "svd", "--ranks", "8,8")


def test_cp_rank():
    args = build_parser().parse_args(["compress", "--methods", "cp-als,cp-als-sigma", "--cp-rank", "12"])
    assert args.cp_rank == 12
    config = compress_config(args)
    assert config.cp_rank == 12 and config.rules() == [(RankRule(cp_rank=12), None)]
    with pytest.raises(ValueError, match="not CP methods"):
        _compress("--methods", "cp-als,tucker2-als", "--cp-rank", "12")
    with pytest.raises(ValueError, match="svd_rank"):
        _compress("--methods", "cp-als", "--cp-rank", "12", "--linear-method", "svd")
    with pytest.raises(ValueError, match="--cp-rank R"):  # a Tucker-2 pair for a CP method
        _compress("--methods", "cp-als-sigma", "--ranks", "8,8")


@pytest.mark.parametrize("argv, message", [
    (["compress", "--cp-rank", "0"], "expected an integer >= 1, got 0"),
    (["compress", "--cp-rank", "x"], "expected an integer >= 1, got 'x'"),
    (["compress", "--svd-rank", "-2"], "expected an integer >= 1, got -2"),
    (["compress", "--cp-rank", "4", "--ranks", "8,8"], "not allowed with argument"),
    (["compress", "--fraction", "0.5", "--ranks", "8,8"], "not allowed with argument"),
    (["compress", "--linear-method", "pca"], "invalid choice: 'pca'"),
    (["compress", "--cp-init", "sobol"], "invalid choice: 'sobol'"),
    (["paper-tables", "--cp-init", "zeros"], "invalid choice: 'zeros'"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, message):
    err = _parse_error(capsys, *argv)
    assert message in err, err


def test_config_errors_exit_2_with_one_line(capsys):
    code = main(["compress", "--methods", "tucker2-als", "--cp-rank", "4", "--no-mlflow", "--no-progress"])
    assert code == 2
    assert "cp_rank is a CP rank" in capsys.readouterr().err


def test_paper_tables_cp_solver():
    default = paper_tables_config(build_parser().parse_args(["paper-tables"]))
    # The CLI's defaults are the config's (the paper's Table 6 protocol: random init over 5 seeds).
    assert default.cp_solver == PaperTablesConfig().cp_solver
    assert default.cp_solver.cp_init == "random" and default.cp_seeds == 5
    config = paper_tables_config(build_parser().parse_args(["paper-tables", "--cp-init", "svd", "--cp-max-iter",
                                                            "7", "--cp-seeds", "2"]))
    assert config.cp_solver == SolverOptions(max_iter=7, cp_init="svd") and config.cp_seeds == 2
    assert config.solver.cp_init == "svd"  # Tables 3-4 have no CP column


def test_yaml_solver_cp_init_and_hybrid_keys(tmp_path):
    from jobs.yaml_config import ConfigError, compress_config_from_yaml, sweep_config_from_yaml

    path = tmp_path / "c.yaml"
    path.write_text("methods: [cp-als, cp-als-sigma]\nsolver: {max_iter: 20, cp_init: random, seed: 2}\n"
                    "linear_method: svd-sigma\nsvd_rank: 8\n")
    config = compress_config_from_yaml(path)
    assert config.solver == SolverOptions(max_iter=20, cp_init="random", seed=2)
    assert config.linear_method == "svd-sigma" and config.svd_rank == 8
    assert compress_config_from_yaml(path, solver={"cp_init": "svd"}).solver.cp_init == "svd"  # --set override

    path.write_text("solver: {cp_init: sobol}\n")
    with pytest.raises(ConfigError, match=r"compress\.solver: cp_init must be one of \('svd', 'random'\), got 'sobol'"):
        compress_config_from_yaml(path)
    path.write_text("solver: {cp_inits: random}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'cp_inits' \(did you mean cp_init\?\)"):
        compress_config_from_yaml(path)
    path.write_text("linear_method: tucker2-als\n")
    with pytest.raises(ConfigError, match="linear_method must be an SVD method"):
        compress_config_from_yaml(path)

    path.write_text("methods: [cp-als-sigma]\nsigma_sources: [digits]\nsolver: {cp_init: random}\n")
    assert sweep_config_from_yaml(path).solver.cp_init == "random"


def test_cli_polish(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("sigma-compress ")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    text = capsys.readouterr().out
    assert "(default: 2000)" in text and "plan_layers" not in text
    from pipeline.methods import METHODS

    assert all(f"\n  {name} " in text for name in METHODS)  # one line per method
    assert main(["train", "--device", "cuda"]) == 2 and "CPU only" in capsys.readouterr().err
    _parse_error(capsys, "paper-tables", "--finetune")  # was a silent no-op


def test_image_folder_preprocessing_defaults_to_the_models_own():
    config = _compress("--model", "resnet18", "--weights", "w.safetensors", "--sigma-dataset", "imagefolder",
                       "--sigma-root", "/data", "--eval-dataset", "imagefolder", "--eval-root", "/val")
    view = config.sigma.dataset
    assert (view.image_size, view.resize_size, view.resample) == (224, 256, "bilinear")
    assert view.mean == (0.485, 0.456, 0.406) and config.eval_dataset.std == (0.229, 0.224, 0.225)
    custom = _compress("--model", "resnet18", "--sigma-dataset", "imagefolder", "--sigma-root", "/data",
                       "--image-crop", "160", "--image-resize", "180", "--image-mean", "0.5,0.5,0.5")
    assert (custom.sigma.dataset.image_size, custom.sigma.dataset.resize_size) == (160, 180)
    assert custom.sigma.dataset.identity() != view.identity()
    with pytest.raises(ValueError, match="image folders only"):
        _compress("--image-mean", "0.5")
