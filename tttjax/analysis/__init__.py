"""What a step needs and what the compiler planned for it: the analytic memory estimate
(`memory`), model FLOPs (`flops`), TPU topologies and the collectives of an optimized HLO
(`topology`)."""
