"""The repository's layout never shadows an installed package.

`python -m pytest` (and any Python started in the repository root) puts the root first on
``sys.path``. A top-level ``kernels/`` package once shadowed Hugging Face's ``kernels``, which
transformers imports, and turned most of the suite red without a change of ours.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, env_path: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = str(env_path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_nothing_at_the_root_is_importable():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
    assert importable == [], (f"{importable} at the repository root would shadow installed packages "
                              "of the same name; keep Python code under python/ttscale")


def test_a_package_named_kernels_is_the_installed_one_from_the_root(tmp_path):
    """A stand-in ``kernels`` package on PYTHONPATH wins over anything in the repository root."""
    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("STAND_IN = True\n")
    done = _python("import kernels; print(getattr(kernels, 'STAND_IN', False), kernels.__file__)",
                   cwd=ROOT, env_path=tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True "), f"`import kernels` from the root found {done.stdout.strip()}"


def test_transformers_builds_and_loads_a_model_from_the_root(tmp_path):
    """What failed when the collision was there: transformers imports ``kernels`` as it builds and
    loads a model. Run in the root, as `python -m pytest` is."""
    done = _python(f"""
        import importlib.util, sys
        spec = importlib.util.find_spec("kernels")
        if spec is not None:
            where = [spec.origin or ""] + list(spec.submodule_search_locations or [])
            assert not any(w.startswith({str(ROOT / "kernels")!r}) for w in where), where
        import torch, transformers
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config).eval()
        model.save_pretrained({str(tmp_path / "tiny")!r})
        loaded = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "tiny")!r}).eval()
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        print("ok")
    """, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
