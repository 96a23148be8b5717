"""``python -m fastvl.cli`` (and ``torchrun -m fastvl.cli``): the ``fastvl`` command."""

from . import main

raise SystemExit(main())
