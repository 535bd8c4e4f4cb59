# The commands everyone uses; README.md names `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: demo test bench gpu lint env clean

demo:
	./scripts/setup_env.sh demo
	$(PY) -m ttscale.cli demo

test:
	./scripts/setup_env.sh test,triton
	$(PY) -m pytest -q

bench:
	./scripts/setup_env.sh test,triton
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-only -s

gpu:
	bash bench/gpu.sh

lint:
	$(PY) -m ruff check python tests bench kernels

clean:
	rm -rf build .venv
