# The commands everyone uses; README.md names `make demo` and `make test`.
# Both install from constraints.txt (the versions the suite was last green with);
# `make test-latest` runs the suite on the newest releases instead.
PY := .venv/bin/python
PINS := constraints.txt

.PHONY: demo test test-latest pins bench gpu lint env clean

demo:
	./scripts/setup_env.sh demo $(PINS)
	$(PY) -m ttscale demo

test:
	./scripts/setup_env.sh test,triton,serve,ray $(PINS)
	$(PY) -m pytest -q

test-latest:
	./scripts/setup_env.sh test,triton,serve,ray --latest
	.venv-latest/bin/python -m pytest -q

# After a green `make test-latest`: pin what it ran with (README.md, "Pinned versions").
pins:
	./scripts/freeze_constraints.sh .venv-latest >$(PINS)

bench:
	./scripts/setup_env.sh test,triton,serve,ray $(PINS)
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-only -s

gpu:
	bash bench/gpu.sh

lint:
	./scripts/setup_env.sh lint $(PINS)
	$(PY) -m ruff check python tests bench

clean:
	rm -rf build .venv .venv-latest
