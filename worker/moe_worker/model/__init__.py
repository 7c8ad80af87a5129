"""The MoE model: router, experts, expert-parallel MoE layers, weight sources."""
