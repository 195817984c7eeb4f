"""ReplaceMe: training-free depth pruning by replacing a run of transformer blocks with one linear map."""

__version__ = "0.1.0"
