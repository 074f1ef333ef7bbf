"""Parallelism: the device mesh, logical sharding rules and placement, multi-host start-up."""
