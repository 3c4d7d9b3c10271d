"""The engine imports NumPy only: no Celery, SQL, CLI or the project's other packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = (
    "celery",
    "kombu",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "typer",
    "click",
    "redis",
    "rich",
    "pydantic",
    "pydantic_settings",
    "yaml",
    "service",
    "worker",
    "cli",
    "migrations",
    "sklearn",
    "scipy",
)


def test_engine_imports_and_trains_with_the_upper_layers_blocked() -> None:
    # A meta-path finder that refuses the blocked packages: importing any of them
    # (directly or through a dependency) raises ImportError in the child.
    code = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {BLOCKED!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import engine
        from engine import Trainer, TrainConfig, load_dataset
        cfg = TrainConfig(dataset="xor", optimizer="backprop", max_steps=3)
        trainer = Trainer(cfg, load_dataset("xor", seed=0))
        assert len(list(trainer.steps())) == 3
        cfg = TrainConfig(dataset="moons", optimizer="random_walk", max_steps=3, candidates=2)
        trainer = Trainer(cfg, load_dataset("moons", seed=0))
        list(trainer.steps())
        trainer.result()
        loaded = sorted(m.split(".")[0] for m in sys.modules)
        bad = sorted(set(loaded) & set(BLOCKED))
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_scikit_learn_is_not_imported_even_for_its_bundled_datasets() -> None:
    # Its bundled sets are read from the files it ships: the import (SciPy and the rest)
    # would cost each worker process most of a second at its first run.
    code = textwrap.dedent(
        """
        import sys
        import engine
        engine.load_dataset("spirals", seed=1)
        for name in ("iris", "wine", "breast_cancer", "digits"):
            engine.load_dataset(name, seed=1)
        loaded = {m.split(".")[0] for m in sys.modules}
        assert not loaded & {"sklearn", "scipy"}, sorted(loaded & {"sklearn", "scipy"})
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
