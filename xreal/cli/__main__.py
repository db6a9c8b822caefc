"""``python -m xreal.cli``: the ``xreal`` command line."""

from xreal.cli.app import main

if __name__ == "__main__":
    main()
