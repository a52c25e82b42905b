"""The files that tell a user what they may do with busiseg and how to cite it agree with the
package's own metadata."""

from __future__ import annotations

import tomllib

import yaml
from conftest import REPO


def test_license_and_citation_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["license"] == "MIT" and cff["version"] == project["version"]
    assert cff["preferred-citation"]["version"] == project["version"]
    busi = [r for r in cff["references"] if r.get("doi") == "10.1016/j.dib.2019.104863"]
    assert busi and busi[0]["title"] == "Dataset of breast ultrasound images"


def test_the_readme_stays_a_newcomer_s_page():
    """Details live in docs/: the README stays within 15 KB."""
    assert len((REPO / "README.md").read_bytes()) <= 15_000
