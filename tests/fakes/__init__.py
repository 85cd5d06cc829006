"""Loopback fakes of the services llama-trainer talks to."""
