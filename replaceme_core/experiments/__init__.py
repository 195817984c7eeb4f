"""The paper's experiments, kept apart from the method: the Workbench (cached statistics per profile), report and
claims, plots, the notebook runner (``paper``), and experiment-only methods — healing, self-generated and
task-specific calibration data, token masking, cost accounting, the vision bench."""
