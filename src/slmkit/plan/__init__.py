"""`slm plan`: which approach, model, time, memory and serving speed for a task on this machine (advise.py), from a
cost model (estimate.py) calibrated by measuring the machine (machine.py)."""
