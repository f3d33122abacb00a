.PHONY: setup check test fast demo bench
setup:  ; scripts/setup test
check:  ; scripts/test                       # ruff + mypy + every test
fast:   ; .venv/bin/python -m pytest -n 2 -m "not slow"
demo:   ; scripts/demo
bench:  ; .venv/bin/pixelmill bench classify --images 256
