"""``tta-norm attack``: run a malicious-sample attack grid from a YAML config with command-line overrides.

The arguments and the driver are the grid engine's, shared with ``tta-norm bench``
(:func:`tta_norm.cli.grid.add_grid_arguments`).  Light module-level imports only (the CLI dispatcher
imports this module to build ``--help``).
"""

from __future__ import annotations

import argparse

from tta_norm.cli.grid import GridCommand, add_grid_arguments, run_grid_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(
        parser, "attack_quick", "a YAML file or a shipped attack config: attack_quick (default), attack_medbn"
    )


def attack_command() -> GridCommand:
    from tta_norm.attacks.bench import AttackJob, load_attack_config, shipped_attack_configs

    return GridCommand("attack", shipped_attack_configs, load_attack_config, AttackJob)


def run(args: argparse.Namespace) -> int:
    return run_grid_command(args, attack_command())
