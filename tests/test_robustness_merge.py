"""merge.py against bad settings and faults (issue 11 items 2 and 9) and half-precision task
vectors (issue 10 item 8), through the real command line: one line and status 2 for a bad
setting, nothing written; OUT replaced as a whole (the previous merge or the new one, never a
mix, no stale file); a full disk leaves nothing a rerun would take as complete."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import culturemert.files
from culturemert.checkpoint import read_checkpoint, save_fairseq, save_hf
from culturemert.cli import run
from culturemert.cli.merge import main
from culturemert.merging import (
    METHODS,
    GeneralTaskArithmetic,
    MergePlan,
    RandomDrop,
    SignElection,
    analyse,
    check_density,
    open_source,
    plan_merge,
    register,
)
from culturemert.models.mert import MertModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny base and two adapted models (base + small independent task vectors) as .pt files."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inputs")
    cfg = tiny_config()
    base = MertModel(cfg).state_dict()
    save_fairseq(folder / "base.pt", cfg, base)
    models = []
    for i in range(2):
        models.append({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()})
        save_fairseq(folder / f"m{i}.pt", cfg, models[-1])
    return {"cfg": cfg, "base": base, "models": models, "folder": folder}


def merge_args(inputs: dict, out: Path, *options: str) -> list[str]:
    folder = inputs["folder"]
    return ["--base", str(folder / "base.pt"), "--models", str(folder / "m0.pt"), str(folder / "m1.pt")] + [
        "--out",
        str(out),
        *options,
    ]


def refusal(capsys, argv: list[str]) -> str:
    assert run(main, "merge", argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("merge: ")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Partial outputs beside or inside ``folder`` (swap folders, temporary files)."""
    beside = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    inside = [p.name for p in folder.rglob("*.tmp")] if folder.exists() else []
    return beside + inside


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--lambda", "nan"], "lambdas must be finite numbers, got nan"),
        (["--lambda", "inf"], "lambdas must be finite numbers, got inf"),
        (["--lambdas", "0.2,-inf"], "lambdas must be finite numbers, got -inf"),
        (["--sweep", "0.1,nan"], "lambdas must be finite numbers, got nan"),
        (["--method", "ties", "--density", "0"], "density must be in (0, 1], got 0.0"),
        (["--method", "dare", "--density", "1.5"], "density must be in (0, 1], got 1.5"),
        (["--method", "dare", "--density", "nan"], "density must be in (0, 1], got nan"),
    ],
)
def test_non_finite_lambdas_and_bad_densities_are_one_line_and_write_nothing(
    options, problem, inputs, tmp_path, capsys
):
    assert problem in refusal(capsys, merge_args(inputs, tmp_path / "out", *options))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


def test_a_merge_that_overflows_is_refused_before_anything_is_written(inputs, tmp_path, capsys):
    message = refusal(capsys, merge_args(inputs, tmp_path / "out", "--lambda", "1e39"))
    assert "overflowed to non-finite values" in message and "smaller lambdas" in message
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


def test_merge_json_is_strict_json(inputs, tmp_path):
    assert run(main, "merge", merge_args(inputs, tmp_path / "out", "--lambdas", "0.3,-0.1")) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"merge.json holds {constant}")

    record = json.loads((tmp_path / "out" / "merge.json").read_text(), parse_constant=refuse)
    assert record["lambdas"] == [0.3, -0.1] and record["method"] == "task_arithmetic"


def test_a_new_merge_replaces_the_old_folder_as_a_whole(inputs, tmp_path):
    out = tmp_path / "out"
    assert run(main, "merge", merge_args(inputs, out, "--lambda", "0.5", "--similarity")) == 0
    assert (out / "task_vector_similarity.csv").is_file()
    (tmp_path / ".out.partial").mkdir()  # left by a run killed with SIGKILL
    (tmp_path / ".out.partial" / "checkpoint.pt").write_bytes(b"half")

    assert run(main, "merge", merge_args(inputs, out, "--lambda", "0.1")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "hf", "merge.json"]  # no stale files
    assert json.loads((out / "merge.json").read_text())["lambdas"] == [0.1, 0.1]
    key, base, models = "encoder.layers.0.fc1.weight", inputs["base"], inputs["models"]
    expected = base[key] + 0.1 * (models[0][key] - base[key]) + 0.1 * (models[1][key] - base[key])
    torch.testing.assert_close(
        read_checkpoint(out / "checkpoint.pt")["model"][key], expected, rtol=0, atol=1e-6
    )
    assert not leftovers(out)


def test_a_merge_killed_midway_leaves_the_previous_merge_untouched(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(main, "merge", merge_args(inputs, out, "--lambda", "0.5", "--similarity")) == 0
    before = snapshot(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the checkpoint.pt of the new merge is written, hf/ is not

    monkeypatch.setattr("culturemert.merging.output.save_hf", killed)
    assert run(main, "merge", merge_args(inputs, out, "--lambda", "0.1")) == 130
    assert snapshot(out) == before and not leftovers(out)


class FillingDisk:
    """A file on a disk with ``room[0]`` bytes left: a write beyond it fails with ENOSPC."""

    def __init__(self, path: str | os.PathLike, mode: str, room: list[int]):
        self.file, self.room = open(path, mode), room  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> FillingDisk:
        return self

    def __exit__(self, *exception) -> None:
        self.file.close()

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= size
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


@pytest.mark.parametrize("room", ["in checkpoint.pt", "in hf/model.safetensors"])
def test_a_full_disk_is_one_line_and_leaves_the_previous_merge(room, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run(main, "merge", merge_args(inputs, out, "--lambda", "0.5")) == 0
    before = snapshot(out)
    left = [1000 if room == "in checkpoint.pt" else len(before["checkpoint.pt"]) + 1000]
    monkeypatch.setattr(
        culturemert.files, "open", lambda path, mode: FillingDisk(path, mode, left), raising=False
    )

    message = refusal(capsys, merge_args(inputs, out, "--lambda", "0.1"))
    assert "the disk is full" in message and room.split()[1].split("/")[-1] in message
    assert snapshot(out) == before and not leftovers(out)


def test_half_precision_saves_have_the_task_vectors_of_their_float32_counterparts(inputs, tmp_path):
    """fp16 outputs of runs from an fp32 start, moved by less than fp16 resolves (as stage 2 moves
    LayerNorm weights): against the start rounded to fp16, the cosine similarity of the task
    vectors is that of the fp32 models; against the fp32 start, every weight's rounding would count."""
    cfg, base = inputs["cfg"], inputs["base"]
    torch.manual_seed(1)
    folder = tmp_path / "half"
    folder.mkdir()
    save_fairseq(folder / "base.pt", cfg, base)
    shared = {k: torch.randn_like(v) for k, v in base.items()}  # true cosine 0.5
    halves = []
    for i in range(2):
        model = {k: v + 5e-5 * v.abs() * (shared[k] + torch.randn_like(v)) / 2**0.5 for k, v in base.items()}
        halves.append({k: v.half() for k, v in model.items()})
        save_fairseq(folder / f"full{i}.pt", cfg, model)
        save_fairseq(folder / f"half{i}.pt", cfg, halves[-1])

    def cosine(prefix: str) -> tuple[float, MergePlan]:
        plan = plan_merge(
            open_source(folder / "base.pt"), [open_source(folder / f"{prefix}{i}.pt") for i in range(2)]
        )
        return analyse(plan).cosine()[0, 0, 1].item(), plan

    (full, _), (half, plan) = cosine("full"), cosine("half")
    assert abs(full - 0.5) < 0.05 and abs(half - full) < 0.05, (half, full)
    naive = [torch.cat([(m[k].float() - base[k]).flatten() for k in plan.merged]) for m in halves]
    assert abs(torch.nn.functional.cosine_similarity(*naive, dim=0).item() - full) > 0.15  # the test can fail

    models = [str(folder / f"half{i}.pt") for i in range(2)]
    argv = ["--base", str(folder / "base.pt"), "--models", *models, "--out", str(tmp_path / "out")]
    assert run(main, "merge", argv) == 0
    rounded = json.loads((tmp_path / "out" / "merge.json").read_text())["rounded_base"]
    assert set(rounded) == set(models)
    assert sorted(rounded[models[0]]["float16"]) == sorted(plan.merged)


def test_an_out_folder_holding_other_files_is_refused_not_replaced(inputs, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = refusal(capsys, merge_args(inputs, out))
    assert str(out) in message and "notes.txt" in message
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not leftovers(out)


def test_an_hf_input_with_pytorch_model_bin_merges_like_its_pt(inputs, tmp_path):
    """Older uploads (m-a-p/MERT-v1-95M) hold pytorch_model.bin with weight_g / weight_v names."""
    from safetensors.torch import load_file

    save_hf(tmp_path / "hf", inputs["cfg"], inputs["models"][1])
    legacy = {
        key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): value
        for key, value in load_file(tmp_path / "hf" / "model.safetensors").items()
    }
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(legacy, tmp_path / "hf" / "pytorch_model.bin")
    folder = inputs["folder"]
    as_bin = [str(folder / "m0.pt"), str(tmp_path / "hf")]
    for out, models in (("bin", as_bin), ("pt", [str(folder / "m0.pt"), str(folder / "m1.pt")])):
        argv = ["--base", str(folder / "base.pt"), "--models", *models, "--out", str(tmp_path / out)]
        assert run(main, "merge", [*argv, "--backbone-only"]) == 0
    assert snapshot(tmp_path / "bin" / "hf") == snapshot(tmp_path / "pt" / "hf")


def test_a_method_is_one_registered_class(inputs, tmp_path):
    """DARE's drops with TIES' sign election (mergekit's dare_ties), added as one small class."""

    @register
    class DareTies(GeneralTaskArithmetic):
        name = "dare_ties"

        @classmethod
        def configure(cls, density: float, seed: int) -> DareTies:
            return cls(RandomDrop(check_density(density), seed), SignElection())

    try:
        argv = merge_args(
            inputs, tmp_path / "out", "--method", "dare_ties", "--density", "1", "--lambda", "1"
        )
        assert run(main, "merge", argv) == 0
    finally:
        del METHODS["dare_ties"]
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["method"] == "dare_ties" and record["density"] == 1.0
    key, base, models = "encoder.layers.1.fc1.weight", inputs["base"], inputs["models"]
    taus = torch.stack([model[key] - base[key] for model in models])
    agree = (torch.sign(taus) == torch.sign(taus.sum(0))) & (taus != 0)  # density 1 keeps everything
    expected = base[key] + (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
    merged = read_checkpoint(tmp_path / "out" / "checkpoint.pt")["model"][key]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
