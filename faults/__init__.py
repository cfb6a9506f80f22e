"""Fault tools: real faults (kills, hangs, corrupt segments) injected into short training jobs, and the fault table."""
