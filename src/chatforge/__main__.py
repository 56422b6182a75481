"""`python -m chatforge ...` (and `torchrun -m chatforge ...`) runs the CLI."""

from chatforge.commands.main import main

if __name__ == "__main__":
    raise SystemExit(main())
