"""Command line: ``skmetavi demo`` and ``skmetavi reproduce NAME|all``.

``skmetavi demo [--out DIR] [--seed N] [--quiet]`` meta-learns a divergence and an
initialisation on a task family and compares it with KL-VI on unseen tasks;
``skmetavi reproduce NAME [--budget quick|paper] [--out DIR] [--seed N] [--quiet]``
reproduces a table or figure of the paper (``all``: every one, with one report).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="skmetavi", description="Meta-learned divergences for variational inference."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="meta-learn a divergence on a task family and compare it with KL-VI "
        "on unseen tasks (about a minute)")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--budget", choices=["quick", "smoke"], default="quick",
                      help="'smoke' is a seconds-long run for tests (default: quick)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or lines")
    rep = sub.add_parser("reproduce", help="reproduce a table or figure of the paper")
    rep.add_argument("name", help="experiment name, 'all' to run every one, or 'list'")
    rep.add_argument("--budget", choices=["quick", "paper", "smoke"], default="quick",
                     help="'smoke' is a seconds-long run for tests (default: quick)")
    rep.add_argument("--out", default="results", help="output directory (default: results)")
    rep.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    rep.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        _tune_allocator()
        from skmetavi.experiments._demo import format_demo, run_demo

        result = run_demo(args.out, budget=args.budget, seed=args.seed, quiet=args.quiet)
        print(format_demo(result))
        print("wrote " + ", ".join(result.files.values()))
        return 0
    from skmetavi.experiments import EXPERIMENTS, reproduce, reproduce_all

    if args.name == "all":
        _tune_allocator()
        report = reproduce_all(budget=args.budget, out=args.out, seed=args.seed,
                               verbose=not args.quiet)
        print(f"wrote {report}")
        return 0
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
    _tune_allocator()
    reproduce(args.name, budget=args.budget, out=args.out, seed=args.seed,
              verbose=not args.quiet)
    return 0


def _tune_allocator():
    """The command line owns its process and its joblib workers: reuse freed tensor buffers."""
    from skmetavi._allocator import _glibc, tune_allocator, user_has_chosen

    # Off glibc nothing to tune (and no warning for it); a user's own MALLOC_* or
    # GLIBC_TUNABLES settings are left as they are, in this process and its workers.
    if _glibc() is not None and not user_has_chosen():
        tune_allocator(environ=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
