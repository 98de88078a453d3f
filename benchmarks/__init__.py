"""The scripts that write ``results/``: each is a runner over :func:`vitcompress.apply_stack` (run from the
repository root as ``python -m benchmarks.NAME``). ``gpu.sh`` is the one-command GPU runbook."""
