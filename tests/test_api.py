"""The Python API: the README's example runs as it stands, and gives what metrics.json holds."""

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "api_example.py"


def test_readme_shows_the_example_that_is_tested():
    code = EXAMPLE.read_text().strip()
    assert code in (ROOT / "README.md").read_text(), "README.md must show docs/api_example.py verbatim"


def test_api_example_runs_and_its_numbers_are_the_run_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(EXAMPLE))
    results = scope["results"]
    assert sorted(results) == ["finetune", "icarl"]
    for method, acc in results.items():
        saved = json.loads((tmp_path / "runs" / "sweep" / method / "metrics.json").read_text())
        assert saved["method"] == method and saved["seed"] == 0 and saved["status"] == "complete"
        assert saved["fc"]["final_accuracy"] == acc
    out = capsys.readouterr().out
    assert "methods: " in out and "finetune" in out.splitlines()[0]


def test_package_exports():
    import cilab
    from cilab import DATASETS, METHODS, MODELS, build_config, evaluate_run, run
    from cilab.config import build_config as config_build
    from cilab.experiment import run as experiment_run
    from cilab.reevaluate import evaluate_run as reevaluate_run

    assert build_config is config_build and run is experiment_run and evaluate_run is reevaluate_run
    assert "icarl" in METHODS and "resnet18" in MODELS and "imagefolder" in DATASETS and "cifar10" in DATASETS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cilab.nothing  # noqa: B018


def _lines_of_code(path: Path) -> int:
    """Lines that are not blank, not comments and not docstrings (module, class or function)."""
    import ast

    src = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def test_the_readme_method_table_gives_each_files_true_size():
    """The "lines of code (of the file)" column of README's method table, against the files."""
    import re

    rows = re.findall(r"^\| `([a-z+]+)`[^|]*\| (\d+) \((\d+)\) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == 12, rows
    for name, code, lines in rows:
        path = ROOT / "src" / "cilab" / "methods" / f"{name}.py"
        assert (int(code), int(lines)) == (_lines_of_code(path), len(path.read_text().splitlines())), name
    shared = re.search(r"share `methods/balanced.py` \((\d+) lines of code\)", (ROOT / "README.md").read_text())
    assert int(shared.group(1)) == _lines_of_code(ROOT / "src" / "cilab" / "methods" / "balanced.py")


def test_run_refuses_resume_and_overwrite_together_before_touching_the_folder(tmp_path):
    """The command line refuses --resume with --overwrite; the Python API took both (and overwrote)."""
    import pytest

    from cilab import build_config, run
    from cilab.config import ConfigError

    cfg = build_config("finetune", ["data.name=digits", "scenario.num_tasks=2", "train.epochs=1",
                                    "train.milestones=[]", "train.val_split=0", "train.keep_best=false"])
    with pytest.raises(ConfigError, match="resume=True continues the run in the folder and overwrite=True deletes "
                                          "it; pass one of them"):
        run(cfg, tmp_path / "r", resume=True, overwrite=True)
    assert not (tmp_path / "r").exists()
