"""Where the commands write: one writer of an output at a time, a symbolic link to an output
followed, ``.`` as an output folder, and a destination of the wrong form for a conversion refused
in one line before anything is read, through the real command lines (init_model, convert, merge)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from culturemert.checkpoint import read_checkpoint, save_fairseq, save_hf
from culturemert.cli import run
from culturemert.cli.convert_checkpoint import main as convert_main
from culturemert.cli.init_model import main as init_main
from culturemert.cli.merge import main as merge_main
from culturemert.files import writing
from culturemert.models.mert import MertModel

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base and an adapted model as .pt files, and the base as an HF folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    cfg = tiny_config()
    base = MertModel(cfg).state_dict()
    save_fairseq(folder / "base.pt", cfg, base)
    save_fairseq(folder / "adapted.pt", cfg, {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()})
    save_hf(folder / "hf", cfg, base)
    return {"base": folder / "base.pt", "adapted": folder / "adapted.pt", "hf": folder / "hf"}


def refusal(capsys, main, prog: str, *argv: object) -> str:
    """Run a tool as its command line does; the one line it printed on stderr (status 2)."""
    assert run(main, prog, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, err
    return lines[0]


def merge_args(models: dict[str, Path], out: object, shared: float) -> list[str]:
    return ["--base", models["base"], "--models", models["adapted"], "--lambda", str(shared), "--out", out]


def test_a_second_writer_of_an_output_is_refused_and_the_first_ones_output_is_kept(models, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run(merge_main, "merge", [str(a) for a in merge_args(models, out, 0.2)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config, init = REPO / "configs" / "model" / "tiny.yaml", tmp_path / "init.pt"
    with writing(out), writing(init):  # as another process writing them would hold them
        line = refusal(capsys, merge_main, "merge", *merge_args(models, out, 1.0))
        assert f"{out} is in use by pid {os.getpid()}" in line and "choose another output" in line
        line = refusal(capsys, init_main, "init_model", "--config", config, "--out", init)
        assert f"{init} is in use by pid" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not init.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no lock file left behind
    assert run(init_main, "init_model", ["--config", str(config), "--out", str(init)]) == 0  # released


def test_an_output_named_by_a_symbolic_link_is_written_through_it(models, tmp_path):
    real = tmp_path / "real"
    assert run(merge_main, "merge", [str(a) for a in merge_args(models, real, 0.2)]) == 0
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    assert run(merge_main, "merge", [str(a) for a in merge_args(models, link, 1.0)]) == 0
    assert link.is_symlink() and json.loads((real / "merge.json").read_text())["lambdas"] == [1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "real"]

    pt_link = tmp_path / "model.pt"
    pt_link.symlink_to(tmp_path / "target.pt")
    assert run(convert_main, "convert_checkpoint", [str(models["hf"]), str(pt_link)]) == 0
    assert pt_link.is_symlink() and "model" in read_checkpoint(tmp_path / "target.pt")


def test_dot_names_the_current_folder_as_an_output(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(convert_main, "convert_checkpoint", [str(models["base"]), "."]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_destination_of_the_wrong_form_is_one_line_and_nothing_is_written(models, tmp_path, capsys):
    line = refusal(capsys, convert_main, "convert_checkpoint", models["hf"], f"{tmp_path / 'out'}/")
    assert "an HF folder converts to a .pt file; give a file name" in line
    line = refusal(capsys, convert_main, "convert_checkpoint", models["base"], tmp_path / "model.pt")
    assert "a .pt converts to an HF folder; give a folder name" in line
    (tmp_path / "folder").mkdir()
    line = refusal(capsys, convert_main, "convert_checkpoint", models["hf"], tmp_path / "folder")
    assert f"{tmp_path / 'folder'} is a folder; give the name of a file to write" in line
    config = REPO / "configs" / "model" / "tiny.yaml"
    line = refusal(capsys, init_main, "init_model", "--config", config, "--out", f"{tmp_path / 'new'}/")
    assert "a .pt file is written; give a file name" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any(
        (tmp_path / "folder").iterdir()
    )
