import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run on CPU with DeepSpeed's CPU accelerator and few threads (2-core CI).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tiny_model_cfg():
    from mapet_ds.config import ModelConfig

    return ModelConfig(size=None, embed_dim=48, depth=2, num_heads=3, img_size=64, patch_size=16, drop_path=0.0)


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free local TCP port for a launcher's --master_port (tests run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_data_tool(name: str):
    """Import data/<name>.py (a script folder, not a package) as a module."""
    import importlib.util

    if f"mapet_data_{name}" in sys.modules:  # one module per tool: a second copy's functions would not pickle
        return sys.modules[f"mapet_data_{name}"]
    spec = importlib.util.spec_from_file_location(f"mapet_data_{name}", REPO / "data" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so worker processes can unpickle its functions
    spec.loader.exec_module(mod)
    return mod


def run_py(args, cwd, env=None, check=True, timeout=600):
    """Run a repository script with this interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A tiny demo dataset (10 classes, 48 px) with a pixel k-means token store (vocab 64)."""
    ws = tmp_path_factory.mktemp("ws")
    run_py([REPO / "data/make_demo.py", "--out", "data", "--num-train-per-class", "16",
            "--num-val-per-class", "5", "--size", "48"], cwd=ws)
    run_py([REPO / "launch/tokens.py", "fit", "--filelist", "data/train.txt", "--extractor", "pixel",
            "--img-size", "64", "--patch-size", "16", "--k", "64", "--nredo", "1", "--out", "codebook.pt"], cwd=ws)
    run_py([REPO / "launch/tokens.py", "assign", "--filelist", "data/train.txt", "--codebook", "codebook.pt",
            "--out", "tokens"], cwd=ws)
    (ws / "pretrain.yaml").write_text(
        "model: {size: null, embed_dim: 48, depth: 2, num_heads: 3, img_size: 64, patch_size: 16, drop_path: 0.1}\n"
        "tokenizer: {kind: pixel_kmeans, vocab_size: 64, token_store: tokens}\n"
        "objective: {name: mapet}\n"
        "data: {train_list: data/train.txt, num_threads: 1}\n"
        "optim: {lr: 2.0e-3, warmup_steps: 2, min_lr: 1.0e-4}\n"
        "pretrain: {global_batch_size: 16, max_steps: 8, log_every: 2, save_every: 4, output_dir: runs/pt}\n"
    )
    return ws
