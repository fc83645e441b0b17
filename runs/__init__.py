"""A run directory's whole life (runs/run.py) and k-fold runs of several (runs/kfold.py)."""
