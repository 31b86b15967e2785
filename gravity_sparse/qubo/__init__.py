"""The QUBO math of the solve stage, free of files and configs.

registry (method names, limits; light), formulation (terms, subproblems, BQMs), anneal (bisection, annealing,
repair), exact (brute force, MILP), baselines (greedy, window, random, uniform), profile (the profile
field), synthetic (Gravity-2-shaped test fields).
"""
