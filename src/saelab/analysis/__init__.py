"""Analyses of trained SAEs (dark matter, layer similarity, ...): one plug-in module each, see
:mod:`saelab.analysis.registry`."""
