"""The ``fastconv`` command line."""
import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(prog="fastconv", description="Fast convolution layers for NumPy deep learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, OpenMP and threads on this machine")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastconv.info import main as info_main
        return info_main()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
