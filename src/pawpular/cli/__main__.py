"""``python -m pawpular.cli ...`` (torchrun's ``-m pawpular.cli`` too): the same as the ``pawpular`` command."""

from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
