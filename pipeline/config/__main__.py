"""`python -m pipeline.config --config CONFIG [key=value ...] --get KEY` prints one
resolved value (the Makefile asks it where a config's data and run live); without --get it
prints the whole resolved config as YAML. The `gpt-pipeline config` stage."""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from pipeline.config import get_value, load_config, to_dict
from pipeline.core.errors import cli_main
from pipeline.keys import add_config_arguments, parse_stage_args


@cli_main
def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.config --config CONFIG [key=value ...] --get KEY` prints one
    resolved value (the Makefile asks it where a config's data and run live); without
    --get it prints the whole resolved config as YAML."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=__doc__)
    parser.add_argument("--get", metavar="KEY", help="data_dir | run_dir | name | a dotted key")
    add_config_arguments(parser)
    args = parse_stage_args(parser, argv)
    config = load_config(args.config, args.overrides)
    if args.get is None:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return
    value = get_value(config, args.get)
    if dataclasses.is_dataclass(value):
        value = to_dict(value)
    if isinstance(value, (list, tuple, dict)):
        value = yaml.safe_dump(
            list(value) if isinstance(value, tuple) else value, default_flow_style=True
        ).strip()
    print(value)


if __name__ == "__main__":
    main()
