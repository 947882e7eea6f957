"""Config resolvers, the task wrapper, logging helpers, resume."""
