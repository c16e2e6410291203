"""`python -m pipeline.flows <command>`: the flows CLI (:mod:`pipeline.flows.cli`)."""

from pipeline.flows.cli import main

main()
