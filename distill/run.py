"""`python -m distill run CONFIG`: FastLightGen end to end, teacher bundle -> student bundle.

    importance (Stage I) -> plan -> stage2 (Stage II) -> stage3 (Stage III) -> bundle -> evaluation

Every stage writes into `out/<stage>/` and is skipped when its result is already there, so
an interrupted run resumes (stages II and III also resume mid-stage from their checkpoints).
A config is a json or yaml file; unknown keys and bad values are errors naming the key:

    teacher: flgengine/assets/shapes-teacher    # bundle directory or shipped model name
    out: runs/shapes-4step
    bundle: runs/shapes-4step/bundle            # default: OUT/bundle
    data: {kind: world, seed: 0}                # or {kind: shards, path: DIR, seed: 0}
    importance: {samples: 32, num_t: 12, seed: 1234, batch_size: 16}
    plan: {budget: 0.3, file: null}             # file: a plan.json you wrote or edited (skips Stage I)
    stage2: {steps: 300, ...}                   # Stage2Config; null: no Stage II (prune-then-DMD2)
    stage3: {steps: 200, ...}                   # Stage3Config (real_score, prune: the baselines)
    evaluate: {samples: 60, seeds: [0], batch_size: 20}  # the shapes world's evaluator; null: none
    convert: {num_frames: 81, height: 480, width: 832}  # when teacher is a diffusers Wan directory

The baselines are the same command with switches: `stage2: null` + `stage3.real_score: cfg`
is prune-then-DMD2; additionally `stage3.prune: false` is DMD2 at full size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flgengine.bundle import STORAGE_DTYPES, save_bundle
from flgengine.config import ConfigError, JsonConfig, check_known_keys, type_matches, type_name
from flgengine.model import TwoExpertDiT, main_expert
from flgengine.pipeline import resolve_model
from flgengine.sampling import build_sampler

from . import stage2 as s2
from . import stage3 as s3
from .importance import block_importance, load_importance, save_importance, save_importance_png, sigma_grid
from .data import condition_of, conditioned
from .plan import DEFAULT_BUDGET, PruningPlan, make_plan
from .student import student_evaluator, student_pipeline_config, write_student
from .trainer import init_distributed, rank0_decides, rank0_writes


@dataclass
class RunConfig(JsonConfig):
    teacher: str
    out: str
    bundle: str | None = None
    data: dict = field(default_factory=lambda: {"kind": "world", "seed": 0})
    importance: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    stage2: dict | None = field(default_factory=dict)
    stage3: dict = field(default_factory=dict)
    evaluate: dict | None = field(default_factory=dict)
    convert: dict = field(default_factory=dict)
    storage_dtype: str | None = None  # the student bundle's stored weights: fp16 / bf16 halve the file, int8 quarters it

    IMPORTANCE = {"samples": 32, "num_t": 12, "seed": 1234, "batch_size": 16}
    PLAN = {"budget": DEFAULT_BUDGET, "file": None}
    EVALUATE = {"samples": 60, "seeds": [0], "batch_size": 20}
    CONVERT = {"num_frames": 81, "height": 480, "width": 832, "steps": 50, "guidance": 5.0, "max_length": 512}
    DATA = {"world": {"kind": "world", "seed": 0}, "shards": {"kind": "shards", "path": None, "seed": 0}}
    # the sections' value types (flgengine.config.type_matches hints); POSITIVE ones are >= 1
    TYPES = {"kind": str, "seed": int, "path": str | None, "samples": int, "num_t": int, "batch_size": int,
             "budget": float, "file": str | None, "seeds": list[int], "num_frames": int, "height": int, "width": int,
             "steps": int, "guidance": float, "max_length": int}
    POSITIVE = ("samples", "num_t", "batch_size", "num_frames", "height", "width", "steps", "max_length")

    def __post_init__(self) -> None:
        def section(name: str, value, defaults: dict) -> dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping, got {value!r}")
            check_known_keys(value, list(defaults), name)
            merged = {**defaults, **value}
            for key, v in merged.items():
                hint = self.TYPES[key]
                if not type_matches(v, hint):
                    raise ConfigError(f"{name}.{key} = {v!r}: expected {type_name(hint)}")
                if key in self.POSITIVE and v < 1:
                    raise ConfigError(f"{name}.{key} = {v!r}: expected an integer >= 1")
            if name == "evaluate" and not merged["seeds"]:
                raise ConfigError("evaluate.seeds must name at least one seed")
            if name == "convert" and merged["guidance"] < 0:
                raise ConfigError(f"convert.guidance = {merged['guidance']!r}: expected a number >= 0")
            return merged

        for key in ("teacher", "out"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{key} must be a path, got {getattr(self, key)!r}")
        if self.bundle is not None and (not isinstance(self.bundle, str) or not self.bundle):
            raise ConfigError(f"bundle must be a path or null, got {self.bundle!r}")
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)} or null, got {self.storage_dtype!r}")
        kind = self.data.get("kind") if isinstance(self.data, dict) else None
        if kind not in self.DATA:
            raise ConfigError(f"data.kind must be one of {', '.join(self.DATA)}, got {kind!r}")
        self.data = section("data", self.data, self.DATA[kind])
        if kind == "shards" and not self.data["path"]:
            raise ConfigError("data.path must name the shard directory for data.kind shards")
        self.importance = section("importance", self.importance, self.IMPORTANCE)
        self.plan = section("plan", self.plan, self.PLAN)
        self.convert = section("convert", self.convert, self.CONVERT)
        if self.evaluate is not None:
            self.evaluate = section("evaluate", self.evaluate, self.EVALUATE)
        # the stage recipes validate themselves (strict dataclasses)
        self.stage2_config()
        self.stage3_config()

    def stage2_config(self) -> s2.Stage2Config | None:
        return None if self.stage2 is None else s2.config_from_dict(self.stage2, "stage2")

    def stage3_config(self) -> s3.Stage3Config:
        return s3.config_from_dict(self.stage3, "stage3")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "RunConfig":
        """The config in `path` (json or yaml) with `overrides` ("KEY=VALUE", dotted keys into
        sections, VALUE read as YAML: `stage3.steps=100`, `out=runs/x`, `stage2=null`) applied
        before validation."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for item in overrides:
            apply_override(data, item)
        check_known_keys(data, [f.name for f in dataclasses.fields(cls)], str(path))
        try:
            return cls(**data)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def apply_override(data: dict, item: str) -> None:
    """Sets `data[a][b]... = value` for "a.b...=value" (value parsed as YAML). Sections that are
    absent or null become mappings; the key names themselves are validated with the config."""
    import yaml

    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. stage3.steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if node.get(part) is not None:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is {node[part]!r}, not a section")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ---- pieces the stages share ------------------------------------------------------------------

def load_teacher(cfg: RunConfig):
    """The teacher as a CPU fp32 `flgengine.Pipeline` (DiT, text encoder, codec). A diffusers
    Wan directory is converted once into OUT/teacher (see `flgengine.convert`)."""
    import flgengine

    from flgengine.convert import bundle_from_diffusers, is_diffusers_pipeline

    path = cfg.teacher
    if is_diffusers_pipeline(path):
        path = Path(cfg.out) / "teacher"
        if not (path / "model.safetensors").is_file():
            bundle_from_diffusers(cfg.teacher, path, **cfg.convert)
    return flgengine.load(path, device="cpu", dtype="fp32")


def make_data(cfg: RunConfig, pipe):
    from .data import shard_data, world_data

    if cfg.data["kind"] == "shards":
        return shard_data(pipe, cfg.data["path"], seed=cfg.data["seed"])
    return world_data(pipe, seed=cfg.data["seed"])


# ---- the run ----------------------------------------------------------------------------------

def run_importance(cfg: RunConfig, pipe, data, out: Path, progress: bool = True) -> dict:
    done = out / "importance.json"
    if rank0_decides(done.is_file()):
        return load_importance(done)
    c = cfg.importance
    held_out = 10**9 + 7  # clips the stages never train on
    x0, context = data.batch(held_out, c["samples"])
    result = block_importance(main_expert(pipe.dit), x0, context, sigma_grid(c["num_t"]), seed=c["seed"],
                              batch_size=c["batch_size"], progress=progress, cond=condition_of(data, x0, held_out))
    out.mkdir(parents=True, exist_ok=True)
    rank0_writes(lambda: save_importance(result, done, out / "importance.png"))
    return result


def run_plan(cfg: RunConfig, pipe, importance: dict | None, out: Path) -> PruningPlan:
    if cfg.plan["file"]:
        return PruningPlan.from_json(cfg.plan["file"])
    done = out / "plan.json"
    if rank0_decides(done.is_file()):
        return PruningPlan.from_json(done)
    plan = make_plan(main_expert(pipe.dit), importance["importance"], budget=cfg.plan["budget"],
                     source={"teacher": cfg.teacher, "weights_sha256": pipe.provenance.get("weights_sha256")})
    rank0_writes(lambda: (plan.to_json(done), save_importance_png(importance, out / "plan.png", plan.drop)))
    return plan


STAGES = ("importance", "plan", "stage2", "stage3")


class Run:
    """The stages of one run config, each reading the earlier stages' results from `out`."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg, self.progress, self.out = cfg, progress, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        rank0_writes(lambda: cfg.to_json(self.out / "config.json"))
        self.pipe = load_teacher(cfg)
        self.data = make_data(cfg, self.pipe)

    def importance(self) -> dict:
        return run_importance(self.cfg, self.pipe, self.data, self.out, self.progress)

    def plan(self) -> PruningPlan:
        cfg = self.cfg
        if not cfg.plan["file"] and not (self.out / "plan.json").is_file() and not (self.out / "importance.json").is_file():
            raise FileNotFoundError(f"{self.out}/importance.json: missing; run `python -m distill importance` first "
                                    "or name a plan file (plan.file)")
        importance = None if cfg.plan["file"] else load_importance(self.out / "importance.json")
        return run_plan(cfg, self.pipe, importance, self.out)

    def _need_plan(self) -> PruningPlan:
        if self.cfg.plan["file"]:
            return PruningPlan.from_json(self.cfg.plan["file"])
        if not (self.out / "plan.json").is_file():
            raise FileNotFoundError(f"{self.out}/plan.json: missing; run `python -m distill plan` first")
        return PruningPlan.from_json(self.out / "plan.json")

    def stage2(self) -> tuple[object, dict | None]:
        """The Stage II network (the teacher when stage2 is null) and its provenance record."""
        from flgengine.bundle import load_bundle

        stage2_cfg = self.cfg.stage2_config()
        if stage2_cfg is None:
            return self.pipe.dit, None
        done = self.out / "stage2" / "bundle"
        if rank0_decides((done / "model.safetensors").is_file()):
            return load_bundle(done).model, json.loads((done / "provenance.json").read_text())["stages"][-1]
        net, record = s2.train_stage2(main_expert(self.pipe.dit), self._need_plan(), self.data, stage2_cfg, self.out / "stage2",
                                      progress=self.progress)
        rank0_writes(lambda: save_bundle(done, net, dataclasses.replace(self.pipe.config, low_noise_boundary=None),
                                         {"kind": "stage2 network", "stages": [record]}))
        return net, record

    def _teacher_sampler(self, num_steps: int):
        """(noise, context) -> the teacher's sample in `num_steps` Euler steps with its own guidance
        (Stage III's regression target: the "teacher at 4 steps" baseline, from the same noise)."""
        pipe = self.pipe
        sampler = build_sampler(dataclasses.replace(pipe.config.sampler, kind="euler", num_steps=num_steps),
                                pipe.config.low_noise_boundary)
        device = self.cfg.stage3_config().device
        teacher, uncond = pipe.dit.to(device), self.data.uncond.to(device)

        def sample(noise: torch.Tensor, context: torch.Tensor, cond=None) -> torch.Tensor:
            x = sampler.sample(conditioned(teacher, cond), noise, context, uncond.expand(len(context), -1, -1))
            return (x if cond is None else cond.finish(x)).to(noise.dtype)

        return sample

    def stage3(self, real=None) -> dict:
        cfg = self.cfg
        stage3_cfg = cfg.stage3_config()
        if stage3_cfg.init_student is not None:
            return self._continue_student(stage3_cfg)
        plan = self._need_plan()
        if real is None:
            if cfg.stage2 is not None and not (self.out / "stage2" / "bundle" / "model.safetensors").is_file():
                raise FileNotFoundError(f"{self.out}/stage2/bundle: missing; run `python -m distill stage2` first")
            real, _ = self.stage2()
        # the student (and the fake score) start from the pruned expert; a two-expert teacher's
        # low-noise expert joins the real score whole for t <= its boundary
        init = main_expert(real)
        if isinstance(self.pipe.dit, TwoExpertDiT) and not isinstance(real, TwoExpertDiT):
            real = TwoExpertDiT(real, self.pipe.dit.low, self.pipe.dit.boundary)
        stage3_cfg = cfg.stage3_config()
        student_cfg = student_pipeline_config(self.pipe.config, stage3_cfg)
        evaluate = student_evaluator(self.pipe, student_cfg, cfg.evaluate) if cfg.evaluate is not None else None
        use_plan = plan if (stage3_cfg.prune or stage3_cfg.real_score == "well-guided") else None
        student, record = s3.train_stage3(real, use_plan, self.data, stage3_cfg, self.out / "stage3",
                                          evaluate=evaluate, init=init, progress=self.progress,
                                          regression_target=(self._teacher_sampler(stage3_cfg.num_steps)
                                                             if stage3_cfg.regression > 0 else None))
        stages = [{"stage": "plan", "drop": plan.drop, "keep": plan.keep, "removed_fraction": plan.removed_fraction,
                   "importance": plan.importance}]
        if cfg.stage2 is not None:
            stages.append(self.stage2()[1])
        stages.append(record)
        provenance = {"kind": "FastLightGen student" if cfg.stage2 is not None else "DMD2 student",
                      "teacher": {"path": cfg.teacher, "weights_sha256": self.pipe.provenance.get("weights_sha256")},
                      "config": cfg.to_dict(), "stages": stages}
        bundle = Path(cfg.bundle) if cfg.bundle else self.out / "bundle"
        rank0_writes(lambda: write_student(bundle, student, self.pipe, student_cfg, provenance, cfg.storage_dtype))
        return {"bundle": str(bundle), "provenance": provenance}


    def _continue_student(self, stage3_cfg) -> dict:
        """Stage III from an existing student bundle (stage3.init_student): the teacher with
        plain CFG as the real score, the fake score from the teacher, the student's own blocks."""
        from flgengine.bundle import load_bundle

        cfg = self.cfg
        start = load_bundle(resolve_model(stage3_cfg.init_student))
        real = self.pipe.dit
        init = main_expert(real)
        student_cfg = dataclasses.replace(start.pipeline, text_encoder=self.pipe.config.text_encoder,
                                          codec=self.pipe.config.codec)
        evaluate = student_evaluator(self.pipe, student_cfg, cfg.evaluate) if cfg.evaluate is not None else None
        student, record = s3.train_stage3(real, None, self.data, stage3_cfg, self.out / "stage3", evaluate=evaluate,
                                          init=init, progress=self.progress, student_init=start.model,
                                          regression_target=(self._teacher_sampler(stage3_cfg.num_steps)
                                                             if stage3_cfg.regression > 0 else None))
        prov = start.provenance
        provenance = {"kind": f"{prov.get('kind', 'student')}, continued",
                      "teacher": {"path": cfg.teacher, "weights_sha256": self.pipe.provenance.get("weights_sha256")},
                      "init_student": {"path": stage3_cfg.init_student, "weights_sha256": prov.get("weights_sha256")},
                      "config": cfg.to_dict(), "stages": [*prov.get("stages", []), record]}
        bundle = Path(cfg.bundle) if cfg.bundle else self.out / "bundle"
        rank0_writes(lambda: write_student(bundle, student, self.pipe, student_cfg, provenance, cfg.storage_dtype))
        return {"bundle": str(bundle), "provenance": provenance}


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """All stages (each skipped when its result is in `out`); returns {"bundle", "provenance"}."""
    r = Run(cfg, progress)
    if cfg.stage3_config().init_student is None:  # a continuation of a student needs no plan
        if not cfg.plan["file"]:
            r.importance()
        r.plan()
    real, _ = r.stage2()
    return r.stage3(real)


def run_command(args) -> int:
    cfg = RunConfig.load(args.config, args.set or ())
    rank, _ = init_distributed()  # under torchrun: DDP (or FSDP2 with stage2/stage3 fsdp: true)
    say = print if rank == 0 else (lambda *a: None)
    progress = not args.quiet and rank == 0
    if args.command == "run":
        say(f"student bundle: {run(cfg, progress=progress)['bundle']}")
        return 0
    r = Run(cfg, progress=progress)
    if args.command == "importance":
        r.importance()
        say(f"importance: {r.out / 'importance.json'} and {r.out / 'importance.png'}")
    elif args.command == "plan":
        plan = r.plan()
        say(f"plan: {r.out / 'plan.json'}: drop blocks {plan.drop} ({plan.removed_fraction:.1%} of the parameters)")
    elif args.command == "stage2":
        r.stage2()
        say(f"stage2 network: {r.out / 'stage2' / 'bundle'}")
    else:
        say(f"student bundle: {r.stage3()['bundle']}")
    return 0


def add_args(p) -> None:
    p.add_argument("config", help="run config (json or yaml): see `distill/run.py` and the README")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value before validation (repeatable; dotted keys into sections, "
                        "VALUE read as YAML): --set out=runs/try --set stage3.steps=100 --set stage2=null")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
