"""kl-bench and kl-lab: users of the library, never imported by it."""
