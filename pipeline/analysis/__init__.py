"""Analysis: evaluation of trained policies, the report, and the toy model of the 3D-properties paper."""
