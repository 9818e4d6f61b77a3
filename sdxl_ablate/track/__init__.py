"""Recording: the MLflow tracker, the journal that keeps a run when MLflow fails, and its replay."""
