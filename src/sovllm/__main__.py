"""`python -m sovllm` runs the command-line interface."""

from sovllm.cli import main

main()
