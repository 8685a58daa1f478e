"""The notebooks: stored without outputs, parameterized, and every cell runs on a small finished run.

They execute with nbclient in a kernel of this interpreter (a ``python3`` kernelspec written to a temporary
JUPYTER_PATH, checked from inside the kernel), with PAWPULAR_DATA / PAWPULAR_OUTPUT pointing at the session's
run from ``tests/test_report.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"01_eda": 5, "02_results": 8}  # notebook -> figures it shows on a finished run


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A `python3` kernelspec for this interpreter, ahead of any other on JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "pawpular test kernel",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def execute(
    name: str, data: Path, out: Path, kernel: str, workdir: Path, monkeypatch
) -> tuple[nbformat.NotebookNode, str]:
    """Run a notebook as stored (plus a last cell reporting the kernel's interpreter); return it and that path."""
    from nbclient import NotebookClient

    monkeypatch.setenv("PAWPULAR_DATA", str(data))
    monkeypatch.setenv("PAWPULAR_OUTPUT", str(out))
    nb = read(name)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb, nb.cells[-1].outputs[0]["text"].strip()


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text_of(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs(nb))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_clean_and_parameterized(name, monkeypatch):
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "store notebooks without outputs"
    assert code[0].metadata.get("tags") == ["parameters"]
    monkeypatch.delenv("PAWPULAR_DATA", raising=False)
    monkeypatch.delenv("PAWPULAR_OUTPUT", raising=False)
    params: dict = {}
    exec(code[0].source, {}, params)  # noqa: S102  (the notebook's own parameters cell)
    assert (params["data_dir"], params["output_dir"]) == ("input/synthetic", "output/default")
    monkeypatch.setenv("PAWPULAR_DATA", "/elsewhere")
    exec(code[0].source, {}, params)  # noqa: S102
    assert params["data_dir"] == "/elsewhere"
    assert "from pawpular." in code[1].source
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_on_a_finished_run(name, experiment_run, small_competition, venv_kernel, tmp_path, monkeypatch):
    nb, python = execute(name, small_competition, experiment_run, venv_kernel, tmp_path, monkeypatch)
    assert Path(python).resolve() == Path(sys.executable).resolve(), "the kernel is this venv's python"
    assert not [o for o in outputs(nb) if o["output_type"] == "error"]
    assert not [o["text"] for o in outputs(nb) if o.get("name") == "stderr"], "no warnings in the notebook"
    figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(figures) == NOTEBOOKS[name]
    text = text_of(nb)
    assert "not run" not in text and "Traceback" not in text
    if name == "02_results":
        weights = json.loads((experiment_run / "ensemble" / "weights.json").read_text())["weights"]
        assert f"{experiment_run} (data {small_competition}): nn: ok, svr: ok, ensemble: ok" in text
        table = next(
            o["data"]["text/plain"] for o in outputs(nb) if "oof_rmse" in o.get("data", {}).get("text/plain", "")
        )
        rows = {line.split()[1]: line.split()[2:4] for line in table.splitlines()[1:]}
        for model, w in weights.items():  # the model table shows the blend's weights
            assert float(rows[model][1]) == pytest.approx(w, abs=1e-6)
    else:
        assert f"{small_competition}: 120 train and 16 test photos" in text


@pytest.mark.slow
def test_results_notebook_on_a_partial_run(partial_run, small_competition, venv_kernel, tmp_path, monkeypatch):
    nb, _ = execute("02_results", small_competition, partial_run, venv_kernel, tmp_path, monkeypatch)
    text = text_of(nb)
    assert "svr: not run, ensemble: not run" in text and "study: not run" in text
    assert len([o for o in outputs(nb) if "image/png" in o.get("data", {})]) == NOTEBOOKS["02_results"]
