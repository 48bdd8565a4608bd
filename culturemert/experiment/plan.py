"""The plan of an experiment: its steps in the order they run (thesis chapter 4).

render (tiny only) -> start model -> data preparation per run -> teacher -> CPT per run ->
merges -> token caches and token similarity -> probing (extract per model and task, fit per
layer) -> probes over a run's kept checkpoints (Fig 4.8) -> report. The plan is a generator: the
checkpoint probes are planned once the run that keeps them has finished.

Folders under the experiment's ``out``: render/, start/, data/<run>/ (with the token caches of
the runs on that data in data/<run>/tokens/), teacher/, cpt/<run>/
(the run itself in cpt/<run>/run/), merge/<name>/ (the merge in merge/<name>/merged/),
tokens/<set>/, similarity/, features/<model>/<task>/, probes/<model>/<task>/<layer>/,
checkpoints/<run>/<updates>/..., report/.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from culturemert.experiment.config import CptRun, Experiment, merged_models
from culturemert.experiment.render import render_domains
from culturemert.experiment.steps import REPO, Step, call_tool, run_command
from culturemert.files import write_atomically
from culturemert.fingerprint import file_sha256

CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt$")
logger = logging.getLogger(__name__)


def slug(name: str) -> str:
    """A model name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def run_folder(out: Path, name: str) -> Path:
    """The folder ``run_cpt.sh`` writes a CPT run into: inside the step's folder ``cpt/<name>/``
    (which holds the step's record, log and token caches), since a run folder holds its own
    files only."""
    return out / "cpt" / name / "run"


def merge_folder(out: Path, name: str) -> Path:
    """The folder ``merge.py`` writes a merge into, inside the step's folder ``merge/<name>/``
    (merge.py replaces its output folder whole and refuses files it did not write)."""
    return out / "merge" / name / "merged"


def share_tokens(folder: Path, teacher: Path) -> None:
    """Runs on the same prepared data share its token caches in `folder` (``stage<n>/<split>``,
    built by the first run), which ``teacher.sha256`` ties to the teacher file: caches of another
    teacher are removed (they cannot be used and would be refused) before the run rebuilds them."""
    teacher_hash = file_sha256(teacher)
    marker = folder / "teacher.sha256"
    if folder.exists() and (not marker.is_file() or marker.read_text() != teacher_hash):
        logger.info("token caches %s were made by another teacher: removed", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, lambda handle: handle.write(teacher_hash.encode()))


class Plan:
    """Paths and steps of one experiment (module docstring)."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.out = Path(experiment.out)
        self.models: dict[str, tuple[Path, str | None]] = {}  # name -> (checkpoint, step making it)
        self.data: dict[str, str] = {}  # run -> the run whose prepared data it trains on
        first: dict[tuple, str] = {}
        for run in experiment.runs:  # ablations on the same data share one preparation
            key = (run.data, tuple(run.cultures), run.replay, run.replay_stages)
            self.data[run.name] = first.setdefault(key, run.name)

    def steps(self) -> Iterator[Step]:
        e = self.experiment
        if e.render.domains:
            yield self.render()
        yield from self.start()
        for run in e.runs:
            if self.data[run.name] == run.name:
                yield self.prepare(run)
        yield from self.teacher()
        for run in e.runs:
            yield self.cpt(run)
        for merge in e.merges:
            yield self.merge(merge)
        if e.similarity:
            yield from self.similarity()
        probed = e.probing.models or list(self.models)
        for model in probed:
            for task in e.tasks:
                yield from self.probe(model, task, e.probing.layers, self.out)
        yield from self.checkpoint_probes()

    def render(self) -> Step:
        r = self.experiment.render
        folder = self.out / "render"
        return Step(
            "render",
            folder,
            lambda: render_domains(r, folder),
            [folder / f"{domain}.csv" for domain in r.domains],
            settings=asdict(r),
        )

    def start(self) -> Iterator[Step]:
        s = self.experiment.start
        if s.checkpoint is not None:
            self.models[s.name] = (Path(s.checkpoint), None)
            return
        folder = self.out / "start"
        checkpoint = folder / "start.pt"
        seed = self.experiment.seed
        yield Step(
            "start",
            folder,
            lambda: call_tool(
                "init_model", ["--config", s.model_config, "--out", checkpoint, "--seed", seed]
            ),
            [checkpoint],
            settings={"seed": seed},
            inputs=[Path(s.model_config)],
        )
        self.models[s.name] = (checkpoint, "start")

    def prepare(self, run: CptRun) -> Step:
        e = self.experiment
        folder = self.out / "data" / run.name
        arguments: list[object] = ["--run", run.data, "--out", folder.parent, "--name", run.name]
        arguments += ["--seed", e.seed]
        inputs = [Path(run.data)] if Path(run.data).is_file() else []
        for culture in run.cultures:
            arguments += ["--culture", f"{culture}={e.cultures[culture]}"]
            inputs.append(Path(e.cultures[culture]))
            if culture in e.splits:
                arguments += ["--split", f"{culture}={e.splits[culture]}"]
                inputs.append(Path(e.splits[culture]))
        if run.replay and e.replay is not None:
            arguments += ["--replay", e.replay]
            if "replay" in e.splits:
                arguments += ["--split", f"replay={e.splits['replay']}"]
                inputs.append(Path(e.splits["replay"]))
        if run.replay_stages:
            arguments += ["--replay-stages", run.replay_stages]
        return Step(
            f"data/{run.name}",
            folder,
            lambda: call_tool("prepare_data", arguments),
            [folder / "provenance.json"],
            settings={"arguments": [str(a) for a in arguments]},
            inputs=inputs,
            after=["render"] if e.render.domains else [],
        )

    def teacher(self) -> Iterator[Step]:
        t = self.experiment.teacher
        if t.checkpoint is not None:
            self.teacher_path, self.teacher_step = Path(t.checkpoint), None
            return
        folder = self.out / "teacher"
        self.teacher_path, self.teacher_step = folder / "teacher.th", "teacher"
        manifest = self.out / "data" / self.data[t.from_data_run] / "stage2" / "train.tsv"
        arguments = ["--manifest", manifest, "--from-data-seed", t.seed, "--save-teacher", self.teacher_path]
        yield Step(
            "teacher",
            folder,
            lambda: call_tool("extract_tokens", arguments),
            [self.teacher_path],
            settings={"seed": t.seed},
            after=[f"data/{self.data[t.from_data_run]}"],
        )

    def _teacher_link(self) -> tuple[list[Path], list[str]]:
        """The teacher as an input: its file's hash, or the step making it."""
        return ([], [self.teacher_step]) if self.teacher_step else ([self.teacher_path], [])

    def cpt(self, run: CptRun) -> Step:
        e = self.experiment
        folder = self.out / "cpt" / run.name
        start, start_step = self.models[run.init or e.start.name]
        overrides = list(run.overrides)
        if run.checkpoint_interval:
            overrides += [
                f"checkpoint.save_interval_updates={run.checkpoint_interval}",
                "checkpoint.keep_interval_updates=-1",
            ]
        data = (self.out / "data" / self.data[run.name]).resolve()
        env = {
            "INIT": str(start.resolve()),
            "NAME": run_folder(self.out, run.name).name,
            "MANIFESTS": str(data),
            "ENCODEC": str(self.teacher_path.resolve()),
            "CPT_OUT": str(folder.resolve()),
            "PRESET": e.preset or "",
            "ABLATION": run.ablation or "",
        }

        def train() -> None:
            share_tokens(data / "tokens", self.teacher_path)
            command = ["bash", REPO / "scripts" / "run_cpt.sh", run.config, *overrides]
            run_command(command, folder / "cpt.log", {**env, "TOKENS": str(data / "tokens")})

        checkpoint = run_folder(self.out, run.name) / "stage2" / "checkpoint_last.pt"
        teacher_inputs, teacher_after = self._teacher_link()
        self.models[run.name] = (checkpoint, f"cpt/{run.name}")
        return Step(
            f"cpt/{run.name}",
            folder,
            train,
            [checkpoint, run_folder(self.out, run.name) / "hf" / "config.json"],
            settings={**asdict(run), "preset": e.preset},
            inputs=([start] if start_step is None else []) + teacher_inputs,
            after=[f"data/{self.data[run.name]}", *([start_step] if start_step else []), *teacher_after],
        )

    def merge(self, merge) -> Step:
        e = self.experiment
        folder = self.out / "merge" / merge.name
        base, base_step = self.models[merge.base or e.start.name]
        arguments: list[object] = ["--base", base, "--models"]
        arguments += [self.models[run][0] for run in merge.runs]
        merged = merge_folder(self.out, merge.name)
        arguments += ["--out", merged, "--method", merge.method]
        if merge.density is not None:
            arguments += ["--density", merge.density]
        if len(merge.lambdas) == 1:
            arguments += ["--lambda", merge.lambdas[0]]
            outputs = {merge.name: merged / "checkpoint.pt"}
        else:
            arguments += ["--sweep", ",".join(map(repr, merge.lambdas))]
            names = merged_models(merge)
            outputs = {
                name: merged / f"lambda_{value!r}" / "checkpoint.pt"
                for name, value in zip(names, merge.lambdas)
            }
        if len(merge.runs) > 1:
            arguments.append("--similarity")
        for name, checkpoint in outputs.items():
            self.models[name] = (checkpoint, f"merge/{merge.name}")
        return Step(
            f"merge/{merge.name}",
            folder,
            lambda: call_tool("merge", arguments),
            list(outputs.values()),
            settings=asdict(merge),
            inputs=[base] if base_step is None else [],
            after=[f"cpt/{run}" for run in merge.runs] + ([base_step] if base_step else []),
        )

    def similarity(self) -> Iterator[Step]:
        """Token caches of the sets named by a manifest (a set named by a cache folder, such as a
        CPT run's ``tokens/stage2/train``, is used as it is), then their similarity (Fig 4.3)."""
        sets = self.experiment.similarity
        teacher_inputs, teacher_after = self._teacher_link()
        caches, made, given = [], [], []
        for name, source in sets.items():
            if Path(source).suffix != ".tsv":  # a token cache folder
                caches.append(Path(source))
                given.append(Path(source))
                continue
            folder = self.out / "tokens" / name
            caches.append(folder / "cache")
            made.append(f"tokens/{name}")
            arguments = ["--manifest", source, "--encodec", self.teacher_path, "--out", folder / "cache"]
            yield Step(
                f"tokens/{name}",
                folder,
                lambda arguments=arguments: call_tool("extract_tokens", arguments),
                [folder / "cache" / "meta.json"],
                inputs=[Path(source), *teacher_inputs],
                after=teacher_after,
            )
        folder = self.out / "similarity"
        arguments = ["--caches", *caches, "--names", *sets, "--out", folder / "tables"]
        yield Step(
            "similarity",
            folder,
            lambda: call_tool("token_similarity", arguments),
            [folder / "tables" / "js_divergence.csv", folder / "tables" / "cosine_distance.csv"],
            settings={"names": list(sets)},
            inputs=given,
            after=made,
        )

    def probe(
        self,
        model: str,
        task: str,
        layers: list,
        root: Path,
        checkpoint: Path | None = None,
        after: str | None = None,
    ) -> Iterator[Step]:
        """Extract `model`'s features of `task` once, then fit a probe per layer under `root`."""
        e = self.experiment
        definition = e.tasks[task]
        if checkpoint is None:
            checkpoint, after = self.models[model]
        features = root / "features" / slug(model) / task
        arguments: list[object] = ["extract", "--model", checkpoint, "--task", definition.task]
        arguments += ["--audio-root", definition.audio_root, "--out", features / "cache", "--name", model]
        if definition.metadata:
            arguments += ["--metadata", definition.metadata]
        if definition.splits_root:
            arguments += ["--splits-root", definition.splits_root]
        arguments += ["--no-progress", *e.probing.extract_flags]
        task_inputs = [Path(definition.task)] if Path(definition.task).suffix == ".csv" else []
        extract = (
            f"extract/{slug(model)}/{task}"
            if root == self.out
            else f"{root.name}/extract/{slug(model)}/{task}"
        )
        yield Step(
            extract,
            features,
            lambda: call_tool("probe", arguments),
            [features / "cache" / "meta.json"],
            settings={"arguments": [str(a) for a in arguments if a != checkpoint]},
            inputs=task_inputs + ([checkpoint] if after is None else []),
            after=([after] if after else []) + (["render"] if e.render.domains else []),
        )
        for layer in layers:
            folder = root / "probes" / slug(model) / task / str(layer)
            fit = ["fit", "--features", features / "cache", "--layer", layer, "--out", folder]
            fit += ["--seeds", e.probing.seeds, "--no-progress", *e.probing.fit_flags]
            yield Step(
                f"{extract.replace('extract/', 'fit/')}/{layer}",
                folder,
                lambda fit=fit: call_tool("probe", fit),
                [folder / "results.json", folder / "predictions.npz"],
                settings={"arguments": [str(a) for a in fit]},
                after=[extract],
            )

    def kept_checkpoints(self, run: str) -> list[tuple[int, Path]]:
        """The checkpoints a run kept at its interval, by update count summed over its stages."""
        kept, offset = [], 0
        for stage in sorted(run_folder(self.out, run).glob("stage*")):
            found = sorted(
                (int(match[1]), path)
                for path in stage.glob("checkpoint_*_*.pt")
                if (match := CHECKPOINT.search(path.name))
            )
            kept += [(offset + updates, path) for updates, path in found]
            offset += found[-1][0] if found else 0
        return kept

    def checkpoint_probes(self) -> Iterator[Step]:
        probe = self.experiment.report.checkpoints
        if probe.run is None:
            return
        root = self.out / "checkpoints" / probe.run
        for updates, checkpoint in self.kept_checkpoints(probe.run):
            yield from self.probe(
                f"{probe.run} @{updates}", probe.task, [probe.layer], root, checkpoint, f"cpt/{probe.run}"
            )
