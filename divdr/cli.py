"""``divdr`` command line: ``divdr summary | make-data | baselines | eval-seg | eval-coco``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from divdr.config import ConfigError

COMMANDS = {
    "summary": ("divdr.summary", "parameters, cells, A-space and GFLOPs of a model"),
    "make-data": ("divdr.data.synthetic", "generate the controlled study (Cityscapes seg or COCO det layout)"),
    "baselines": ("divdr.data.baselines", "can colour, random nets or an untrained net find the subsets?"),
    "eval-seg": ("divdr.metrics", "mIoU of train-id prediction PNGs against a Cityscapes gtFine folder"),
    "eval-coco": ("divdr.coco_eval", "COCO bbox / segm mAP of a results JSON (pycocotools COCOeval)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divdr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"divdr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
