"""``python -m parity.nightly_worker [--fault ID] ARGS...``: ``rtdetr-parity ARGS`` in this
process, with a fault of :mod:`parity.faults` patched into the Jittor port while it runs.

The nightly job (:mod:`parity.nightly`) starts its trainers through this module, so that a
fire drill (``rtdetr-parity nightly --fault ID``) reaches inside the Jittor training
subprocess; without ``--fault`` it is exactly ``rtdetr-parity ARGS``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses ``--fault``, then runs :func:`parity.cli.main` on the remaining arguments."""
    parser = argparse.ArgumentParser(prog="python -m parity.nightly_worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", default=None, help="fault id of parity.faults' catalogue")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="rtdetr-parity arguments")
    options = parser.parse_args(argv)
    if not options.args:
        parser.error("give the rtdetr-parity arguments to run, e.g. train --framework jittor ...")
    from .cli import main as cli_main

    patch = contextlib.nullcontext()
    if options.fault is not None:
        from .faults import applied, catalogue

        try:
            fault = catalogue([options.fault])[0]
        except ValueError as exc:
            parser.error(str(exc))
        print(f"nightly worker: fault {fault.id} applied to the Jittor port ({fault.what})",
              flush=True)
        patch = applied(fault)
    with patch:
        return cli_main(options.args)


if __name__ == "__main__":
    sys.exit(main())
