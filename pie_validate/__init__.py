"""Validation: the executor measures, the simulator predicts, on the same requests and engine (`pie-validate`).
The one package that uses both backends; neither backend imports it."""
