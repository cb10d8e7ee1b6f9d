"""Training: optimizer.py (OptimConfig, make_optimizer), schedules.py, losses.py, precision.py."""
