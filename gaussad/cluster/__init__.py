"""The Ray engine: fitting, scoring and evaluating on a Ray cluster, with the results of one machine.

`session.ray_cluster` connects to a cluster (or starts a local one); `fit`, `predict` and `evaluate` hold the
work each command sends to it. Every piece of work calls the library itself: nothing here computes a
statistic or a score of its own.
"""
