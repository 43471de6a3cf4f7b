"""Policy: sender scope, limits and abuse defence, applied by the session."""
