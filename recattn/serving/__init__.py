"""Real-time recommendation: incremental user state, top-K, HTTP service."""
