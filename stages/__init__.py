"""One module per DVC stage (python -m stages.<name>): read params and inputs, call pipeline/, write outputs."""
