"""Compose work from validated configs: the CLI, the demo, single runs, sweeps, staged pipelines, reports."""
