"""Development tooling shared by the tests and the benchmarks (never part of the node pack)."""
