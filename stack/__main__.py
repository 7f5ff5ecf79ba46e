"""`python -m stack ui` (the Airflow UI and the MLflow UI on the embedded state) and
`python -m stack demo-loop` (the closed loop on an embedded scheduler)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ui = commands.add_parser("ui", help="the Airflow UI and the MLflow UI on the embedded state, on 127.0.0.1")
    ui.add_argument("--port", type=int, default=os.environ.get("UI_PORT") or "8080",
                    help="the Airflow UI's port (default: $UI_PORT or 8080)")
    ui.add_argument("--mlflow-port", type=int, default=os.environ.get("MLFLOW_PORT") or "5000",
                    help="the MLflow UI's port (default: $MLFLOW_PORT or 5000)")
    commands.add_parser("demo-loop", add_help=False, help="the closed loop: python -m stack demo-loop --help")
    args, rest = parser.parse_known_args(argv)
    if args.command == "ui":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from stack.airflow_local import run_ui

        return run_ui(args.port, args.mlflow_port)
    from stack.demo_loop import main as demo_loop

    return demo_loop(rest)


if __name__ == "__main__":
    sys.exit(main())
