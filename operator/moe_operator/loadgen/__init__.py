"""The load generator behind ``moe-eplb bench-serve``: traffic plans, an OpenAI-compatible
streaming client, the run loop and its statistics."""
