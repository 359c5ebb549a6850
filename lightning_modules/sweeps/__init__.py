"""Many runs: grids, seeds, k-fold, Optuna searches and the recipe table, each run an `ftlab` child process."""
