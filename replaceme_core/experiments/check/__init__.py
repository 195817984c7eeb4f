"""The offline profile check (`python -m replaceme_core.experiments.paper --profile NAME --check`): facts, report,
notebook_scan, schema, models, tasks, sources and estimate each check or estimate one thing; run puts them together."""
from .facts import HUB_MODELS, HubModel
from .notebook_scan import NOTEBOOKS_DIR, _missing, scan_notebook
from .report import NetworkUsed, Report, no_network
from .run import check_profile, run_check

__all__ = ["HUB_MODELS", "NOTEBOOKS_DIR", "HubModel", "NetworkUsed", "Report", "_missing", "check_profile",
           "no_network", "run_check", "scan_notebook"]
