"""An app of the fixture project: its ``tasks`` module is imported by autodiscovery, by nothing else."""
