"""Pie's discrete-event simulator: executes pie_policy's plans in simulated time over hwmodels."""
