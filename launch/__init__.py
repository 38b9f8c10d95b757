"""Launchers: sweeps over config settings."""
