"""The GPU bundle (issue 25): carry the project, the packaged assets and the missing wheels to a network-less GPU node
in parts that each fit one transfer, run one slice there with `run.sh`, bring the figures back in at most 8 files.

slices.py (what a slot runs, its estimate), builder.py (`make bundle`), run.sh + verify_env.py + pack.py (node side),
check.py (`make bundle-check`: the whole path on CPU in a fresh environment with no index and no network)."""
