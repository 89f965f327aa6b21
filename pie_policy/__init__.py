"""Every decision of Pie (batching, block tables, layer swapping, adaptive expansion, baselines).

Imports neither torch nor simpy: the simulator and the executor run this same code.
"""
