"""Job runners behind the entry points (train.py, eval.py, explain.py, study.py, the benchmark): Hydra config in, files out."""
