"""The generated reference pages: every key, parameter and metric has words, and is shown."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from pipeline.config.topology import Topology
from pipeline.observability.metrics import Metrics
from pipeline.tools import docgen

ROOT = Path(__file__).resolve().parents[3]


def test_every_config_field_stage_parameter_backend_option_and_metric_is_documented() -> None:
    assert docgen.undocumented() == []


def test_a_field_without_words_is_caught() -> None:
    class Section(BaseModel):
        """A section."""

        said: int = Field(1, description="It is said.")
        mentioned: int = 2
        silent: int = 3

    fields: dict[str, FieldInfo] = Section.model_fields
    assert docgen._words("said", fields["said"], "") == "It is said."
    assert docgen._words("mentioned", fields["mentioned"], "uses ``mentioned``") is not None
    assert docgen._words("silent", fields["silent"], "uses ``mentioned``") is None
    assert "**undocumented**" in "\n".join(docgen._table(Section, ""))


def test_the_reference_pages_show_every_key_and_every_metric() -> None:
    pages = docgen.pages()
    reference = pages["reference/topology.md"]
    for path, model in docgen._models(Topology):
        for name in model.model_fields:
            assert f"| `{name}` |" in reference, f"{path}.{name}"
    catalog = pages["reference/metrics.md"]
    for name, _, _, _ in docgen._families(Metrics()):
        assert f"| `{name}` |" in catalog
    assert "## `xgboost`" in pages["reference/backends.md"]
    assert "## `tokenize`" in pages["reference/stages.md"]


def test_the_results_page_shows_every_result_file_and_plot() -> None:
    files = docgen.results(ROOT)
    page = files["benchmarks/results.md"]
    assert isinstance(page, str)
    for md in (ROOT / "load" / "results").glob("*.md"):
        assert f"## `{md.name}`" in page
    plots = [p for p in files if p.endswith(".png")]
    assert plots
    for plot in plots:
        assert plot.removeprefix("benchmarks/") in page
