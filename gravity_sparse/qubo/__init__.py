"""QUBO solve stage: head and block keep/drop decisions by simulated annealing, plus baselines.

formulation (BQM construction), anneal (bisection, annealing, repair), baselines, exact (brute force,
MILP), report (plots), stage (SolveConfig, solve_field, write_solve_outputs), synthetic (test fields).
"""
