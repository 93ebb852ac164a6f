"""Adapters that embed the manager in serving engines. Each is imported on its own (it imports its
engine); nothing in the core imports them."""
