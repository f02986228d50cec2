"""DCM node-pack benchmarks: ``python -m bench.run`` (see bench/README.md)."""
