"""`python -m pipeline.flows <command>`: the flows CLI."""

from pipeline.flows import main

main()
