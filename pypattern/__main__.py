"""``python -m pypattern``: the same command line as ``pypattern`` (:func:`pypattern.cli.main`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
