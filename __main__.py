"""`python -m cnnbench ...`: the same CLI as `cnnbench ...` and `python cli.py ...`."""
from cnnbench.cli import main

main()
