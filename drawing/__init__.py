"""What training draws for people to look at: preview PNG grids and loss.png. Kept out of train/, so `train`
imports no image library (it reads only the cache); it imports neither stage (tests/test_boundaries.py)."""
