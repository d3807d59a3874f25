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
    from cilab import DATASETS, METHODS, MODELS, build_config, run
    from cilab.config import build_config as config_build
    from cilab.experiment import run as experiment_run

    assert build_config is config_build and run is experiment_run
    assert "icarl" in METHODS and "resnet18" in MODELS and "imagefolder" in DATASETS and "cifar10" in DATASETS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cilab.nothing  # noqa: B018
