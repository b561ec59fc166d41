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
