"""Command line: ``skmetavi reproduce NAME [--budget quick|paper] [--out DIR] [--seed N]``."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="skmetavi", description="Meta-learned divergences for variational inference."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="reproduce a table or figure of the paper")
    rep.add_argument("name", help="experiment name, or 'list' to list them")
    rep.add_argument("--budget", choices=["quick", "paper"], default="quick")
    rep.add_argument("--out", default="results", help="output directory (default: results)")
    rep.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from skmetavi.experiments import EXPERIMENTS, reproduce

    if args.name == "list":
        for name, entry in EXPERIMENTS.items():
            print(f"{name:10s} {entry[0]}")
        return 0
    if args.name not in EXPERIMENTS:
        print(
            f"skmetavi: unknown experiment {args.name!r}; choose from {sorted(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    reproduce(args.name, budget=args.budget, out=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
