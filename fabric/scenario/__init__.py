"""Scenarios: load a topology YAML, plan its DTE decisions, run it on live daemons."""
