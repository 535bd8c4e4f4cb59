"""The toy trainer's smoke run produces policy and PRM directories our loader reads (issue 7)."""

import json
import os
import subprocess
import sys

import pytest

from ttscale.model import load_model, load_tokenizer
from ttscale.toy.tokenizer import build_tokenizer


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_models(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ttscale.toy.train", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("policy", "prm"):
        model = load_model(tmp_path / name)
        assert model.config.vocab_size == build_tokenizer().get_vocab_size()
        assert load_tokenizer(tmp_path / name).decode(load_tokenizer(tmp_path / name).encode("Q: 1+2")) == "Q: 1+2"
    report = json.loads((tmp_path / "policy" / "training_report.json").read_text())
    assert report  # the metrics the script printed are kept beside the weights
