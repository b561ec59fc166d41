"""The ``tta-norm`` dispatcher: one module per subcommand, --version, help that shows the config defaults."""

from __future__ import annotations

import importlib

import pytest

from tta_norm import __version__
from tta_norm.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_module_has_add_arguments_and_run():
    for name, (module, _) in SUBCOMMANDS.items():
        if module.startswith("corruptions."):
            continue  # the independent corruptions package keeps its own command module
        mod = importlib.import_module(module)
        assert module.startswith("tta_norm.cli."), name
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tta-norm {__version__}"


def test_help_strings_read_the_config_defaults(capsys):
    from tta_norm.fitting.sabn import SaBNConfig
    from tta_norm.fitting.ttn import TTNConfig

    parser = build_parser()
    for command, config in (("ttn-fit", TTNConfig()), ("sabn-train", SaBNConfig())):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"(default {config.epochs})" in text and f"(default {config.lr})" in text, command


@pytest.mark.parametrize("command", ["ttn-fit", "sabn-train"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-images", "0"], "--n-images must be >= 1"),
        (["--device", "cuda:7"], "CUDA device(s)"),
        (["--device", "bogus"], "unknown device 'bogus'"),
    ],
)
def test_fitting_commands_refuse_bad_options_in_one_line(command, extra, message, tmp_path, capsys):
    args = [command, "--out", str(tmp_path / "x.pt"), *extra]
    if command == "sabn-train":
        args += ["--domains", "clean,blur"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()
