"""``python -m bench [options]`` runs the report; ``python -m bench compare OLD NEW`` compares two."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        from bench import compare
        return compare.main(argv[1:])
    from bench import report
    return report.main(argv)


if __name__ == "__main__":
    sys.exit(main())
