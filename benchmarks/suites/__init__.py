"""The data-set benchmarks (run by benchmarks/bench.py): each trains through lstainnorm compare's engine
and tables its records; not part of the package."""
