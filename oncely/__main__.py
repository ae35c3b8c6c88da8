"""`python -m oncely`: the `oncely` command, where the script is not on PATH."""

from oncely.cli import main

main(prog_name="oncely")
