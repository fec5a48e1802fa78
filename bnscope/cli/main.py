"""The ``bnscope`` console script: the app with every command registered, in help order."""

from __future__ import annotations

from bnscope.cli.app import app
from bnscope.cli.commands import check, fold, inspect, providers, quantize, recalibrate, run, stats
from bnscope.cli.group import ManPageCommand

COMMANDS = (
    inspect.inspect,
    stats.stats,
    stats.merge,
    fold.fold,
    quantize.quantize,
    run.run,
    recalibrate.recalibrate,
    check.check,
    providers.providers,
)
for _command in COMMANDS:
    app.command(cls=ManPageCommand)(_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bnscope")


if __name__ == "__main__":  # pragma: no cover
    main()
