import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from repo_utils import repo_params

from pipeline.flows.settings import FlowParams
from pipeline.settings.base import SECTIONS, ConfigError, StageParams
from pipeline.settings.params import Params

BASE = repo_params()


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def test_repository_params_parse():
    p = Params.load("params.yaml")
    assert set(p.train.variants) == {"dpo", "dpop"}
    assert p.train.variants["dpop"].losses[0].hp == {"beta": 0.1, "dpop_lambda": 50.0}
    assert p.train.variants["dpo"].settings.lr == BASE["train"]["lr"]
    assert p.variant("dpo") is p.train.variants["dpo"]
    with pytest.raises(
        ConfigError, match=r"^params\.yaml: train\.variants\.nope: no such variant \(have \['dpo', 'dpop'\]\)"
    ):
        p.variant("nope")


@pytest.mark.parametrize(
    "path,value,key",
    [
        ("sample.n", "four", "sample.n"),
        ("sample.temperature", [1], "sample.temperature"),
        ("train.lr", "fast", "train.lr"),
        ("prepare.on_bad_rows", "ignore", "prepare.on_bad_rows"),
        ("pairs.heldout_fraction", 1.5, "pairs.heldout_fraction"),
        ("policy.warmup.epochs", 0, "policy.warmup.epochs"),
        ("pairs.constructed.edits", ["final", "swap"], "pairs.constructed.edits"),
        ("pairs.constructed.edits", ["final", "final"], "pairs.constructed.edits"),
        ("pairs.constructed.edits", [], "pairs.constructed.edits"),
        ("pairs.constructed.chosen", ["other"], "pairs.constructed.chosen"),
    ],
)
def test_wrong_type_names_the_key(path, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Params.parse(_with(path, value))


def test_unknown_key_is_refused():
    raw = _with("sample.temprature", 0.5)
    with pytest.raises(ConfigError, match=r"sample\.temprature"):
        Params.parse(raw)


def test_missing_model_folder_fails_at_once(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.model.*does not exist"):
        Params.parse(_with("policy.model", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"policy\.model.*config\.json"):
        Params.parse(_with("policy.model", str(tmp_path / "empty")))


def test_variant_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.beta"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": "high"}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo: unknown loss 'no_such'"):
        Params.parse(_with("train.variants.dpo", {"loss": "no_such", "beta": 0.1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpop\.dpop_lambda"):
        Params.parse(_with("train.variants.dpop", {"loss": "dpop", "beta": 0.1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.lr"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "lr": -1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.x\.loss"):
        Params.parse(_with("train.variants", {"x": {"beta": 0.1}}))


def test_variant_overrides_and_combined_terms():
    raw = _with(
        "train.variants",
        {
            "mix": {
                "loss": [
                    {"name": "dpo", "beta": 0.2},
                    {"name": "dpo_sft", "weight": 0.5, "beta": 0.2, "sft_weight": 1.0},
                ],
                "lr": 1e-4,
            },
        },
    )
    v = Params.parse(raw).train.variants["mix"]
    assert [t.name for t in v.losses] == ["dpo", "dpo_sft"]
    assert v.losses[1].weight == 0.5
    assert v.settings.lr == 1e-4 and v.settings.epochs == BASE["train"]["epochs"]


def test_reference_and_training_must_truncate_and_round_alike():
    """The reference log-probs are computed once, at reference.max_length and train.bf16: training
    (every variant) must use the same, or lp − ref is not zero before the first step."""
    raw = _with("train.max_length", BASE["reference"]["max_length"] - 32)
    with pytest.raises(ConfigError, match=r"train\.max_length: \d+ differs from reference\.max_length \d+"):
        Params.parse(raw)
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.max_length: 96 differs from train\.max_length"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "max_length": 96}))
    bf16 = BASE["train"]["bf16"]
    with pytest.raises(ConfigError, match=r"train\.variants\.dpop\.bf16: .* differs from train\.bf16"):
        Params.parse(_with("train.variants.dpop", {"loss": "dpop", "beta": 0.1, "dpop_lambda": 5.0, "bf16": not bf16}))
    shared = BASE["train"]["shared_prompt"]
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.shared_prompt: .* differs from train\.shared_prompt"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "shared_prompt": not shared}))
    other = {"math": "flash", "flash": "math"}[BASE["train"]["cpu_attention"]]
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.cpu_attention: .* differs from train\.cpu_attention"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "cpu_attention": other}))
    with pytest.raises(ConfigError, match=r"train\.cpu_attention"):
        Params.parse(_with("train.cpu_attention", "fused"))
    assert Params.parse(_with("train.cpu_attention", other)).train.variants["dpo"].settings.cpu_attention == other
    # Restating the shared values is fine; changing both sides together too.
    same = _with(
        "train.variants.dpo", {"loss": "dpo", "beta": 0.1, "bf16": bf16, "max_length": BASE["reference"]["max_length"]}
    )
    assert Params.parse(same).train.variants["dpo"].settings.bf16 == bf16
    both = _with("train.max_length", 96)
    both["reference"]["max_length"] = 96
    assert Params.parse(both).train.variants["dpo"].settings.max_length == 96


def test_a_variant_may_turn_on_checkpointing_and_offload_needs_fsdp():
    raw = _with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "gradient_checkpointing": True})
    train = Params.parse(raw).train
    assert train.variants["dpo"].settings.gradient_checkpointing is True
    assert train.variants["dpop"].settings.gradient_checkpointing is train.gradient_checkpointing is False
    raw = _with("train.runtime.offload", True)
    raw["train"]["runtime"]["strategy"] = "ddp"
    with pytest.raises(ConfigError, match=r"train\.runtime\.offload: true needs train\.runtime\.strategy: fsdp"):
        Params.parse(raw)
    raw["train"]["runtime"]["strategy"] = "fsdp"
    assert Params.parse(raw).train.runtime.offload is True


def test_lora_is_on_by_its_rank_and_a_variant_overrides_its_keys():
    """train.lora.r = 16 (as `dvc exp run -S train.lora.r=16` writes it) turns LoRA on for every variant; a
    variant's lora keys merge over the shared ones; load_in_4bit is the reference's and needs an adapter."""
    assert Params.parse(BASE).train.variants["dpo"].settings.lora.r == 0  # the default: a full fine-tune
    on = Params.parse(_with("train.lora.r", 16)).train
    assert {v.settings.lora.r for v in on.variants.values()} == {16}
    raw = _with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "lora": {"r": 4, "target_modules": ["q_proj"]}})
    lora = Params.parse(raw).train.variants["dpo"].settings.lora
    assert (lora.r, lora.target_modules, lora.alpha) == (4, ["q_proj"], BASE["train"]["lora"]["alpha"])
    assert Params.parse(raw).train.variants["dpop"].settings.lora.r == 0
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.lora\.r: Input should be greater than"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "lora": {"r": -1}}))
    for bad in ("all-of-them", []):
        with pytest.raises(ConfigError, match=r"train\.lora\.target_modules: all-linear or a non-empty list"):
            Params.parse(_with("train.lora.target_modules", bad))
    with pytest.raises(ConfigError, match=r"train\.lora: .*load_in_4bit needs r > 0"):
        Params.parse(_with("train.lora.load_in_4bit", True))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.lora\.load_in_4bit: True differs from train"):
        Params.parse(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "lora": {"r": 8, "load_in_4bit": True}}))
    qlora = _with("train.lora", {**BASE["train"]["lora"], "r": 8, "load_in_4bit": True})
    assert Params.parse(qlora).train.variants["dpo"].settings.lora.load_in_4bit
    qlora["train"]["runtime"].update(nproc=2, strategy="fsdp")
    with pytest.raises(ConfigError, match=r"train\.lora\.load_in_4bit: a 4-bit base is not sharded with FSDP2"):
        Params.parse(qlora)


def test_reference_check_tolerance_is_a_setting():
    assert Params.parse(BASE).train.ref_check_tol == BASE["train"]["ref_check_tol"] > 0
    raw = copy.deepcopy(BASE)
    del raw["train"]["ref_check_tol"]
    with pytest.raises(ConfigError, match=r"train\.ref_check_tol: Field required"):
        Params.parse(raw)
    with pytest.raises(ConfigError, match=r"train\.ref_check_tol"):
        Params.parse(_with("train.ref_check_tol", 0))


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Params.load(tmp_path / "params.yaml")


def test_unknown_train_key_is_refused():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        Params.parse(_with("train.lrr", 1e-5))


def test_backends_and_scenarios_are_checked(tmp_path):
    assert Params.parse(_with("sample.backend", "vllm")).sample.backend == "vllm"
    with pytest.raises(ConfigError, match=r"sample\.backend"):
        Params.parse(_with("sample.backend", "tgi"))
    with pytest.raises(ConfigError, match=r"vllm\.gpu_memory_utilization"):
        Params.parse(_with("vllm.gpu_memory_utilization", 1.5))
    # accuracy before and after training must come from the same decoder
    with pytest.raises(ConfigError, match=r"evaluate\.generation\.backend.*policy\.eval\.backend"):
        Params.parse(_with("evaluate.generation.backend", "vllm"))
    with pytest.raises(ConfigError, match=r"sample_other\.model.*does not exist"):
        Params.parse(_with("sample_other.model", str(tmp_path / "nope")))
    for k in (1, 2, 3, 4):
        assert Params.parse(_with("pairs.scenario", k)).pairs.scenario == k
    raw = _with("pairs.scenario", 3)
    raw["judge"].update(backend="llm")
    raw["judge"]["llm"].update(mode="listwise")
    with pytest.raises(ConfigError, match=r"pairs\.scenario.*absolute scores"):
        Params.parse(raw)


def test_unknown_section_is_refused():
    raw = _with("trian", {"lr": 1e-5})
    with pytest.raises(ConfigError, match=r"params\.yaml: trian: unknown section"):
        Params.parse(raw)


# --------------------------------------------------------------------------------------------- ground floor
SETTINGS_MODULES = {
    "pipeline.settings.base",
    "pipeline.settings.evaluate",
    "pipeline.settings.judge",
    "pipeline.settings.pairs",
    "pipeline.settings.params",
    "pipeline.settings.policy",
    "pipeline.settings.prepare",
    "pipeline.settings.report",
    "pipeline.settings.sampling",
    "pipeline.settings.train",
    "pipeline.training.loss_hparams",
    "pipeline.analysis.toy_settings",
    "pipeline.model.builtin",
}


def test_settings_do_not_import_torch():
    """Loading every stage's settings imports pydantic and yaml, none of the heavy packages."""
    # In a fresh interpreter: the test process itself has torch loaded by other tests.
    code = (
        "import sys; from pipeline.settings.params import Params; Params.load('params.yaml'); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'prefect', "
        "'polars', 'dvc')); "
        "print(heavy); print(sorted(m for m in sys.modules if m.startswith('pipeline')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, ours = out.splitlines()
    assert heavy == "[]", heavy
    packages = {"pipeline", "pipeline.settings", "pipeline.training", "pipeline.analysis", "pipeline.model"}
    assert set(ast.literal_eval(ours)) == SETTINGS_MODULES | packages


def _stage_views() -> dict[str, type[StageParams]]:
    """Each stage module's view of params.yaml (its ``Settings``, or the view it loads by another name)."""
    import importlib

    spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    views = {}
    for name, stage in spec.items():
        module = importlib.import_module((stage.get("do", stage))["cmd"].split()[2])
        loaded = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, StageParams) and v is not StageParams
        ]
        assert loaded, f"stages/{name}.py defines or imports no StageParams view"
        views[name] = max(loaded, key=lambda v: len(v.model_fields))
    return views


def test_each_stage_validates_the_sections_its_params_name():
    """A stage's view holds every section its dvc.yaml params come from, and never flows: (no stage reads it,
    so a flow setting change reruns nothing)."""
    spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    for name, view in _stage_views().items():
        params = (spec[name].get("do", spec[name])).get("params", [])
        sections = {(p if isinstance(p, str) else next(iter(p))).split(".")[0] for p in params}
        assert sections <= set(view.model_fields), (name, sections - set(view.model_fields))
        assert "flows" not in view.model_fields and set(view.model_fields) <= set(SECTIONS), name
    # the first stage validates every section a stage reads, so a fresh `dvc repro` fails at once
    assert set(_stage_views()["prepare"].model_fields) == set(SECTIONS) - {"flows"}


def test_a_stage_fails_on_its_own_sections_only():
    """A bad value in a section a stage does not read does not stop it; one in a section it reads does."""
    from stages.judge import JudgedPairs
    from stages.toy import Settings as ToySettings

    bad_train = _with("train.lr", "fast")
    assert ToySettings.parse(bad_train).toy.steps == BASE["toy"]["steps"]
    with pytest.raises(ConfigError, match=r"train\.lr"):
        Params.parse(bad_train)
    with pytest.raises(ConfigError, match=r"judge\.min_gap"):
        JudgedPairs.parse(_with("judge.min_gap", -1))


def test_a_missing_key_is_named_not_defaulted():
    raw = copy.deepcopy(BASE)
    del raw["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr: Field required"):
        Params.parse(raw)
    raw = copy.deepcopy(BASE)
    del raw["toy"]
    with pytest.raises(ConfigError, match=r"toy: Field required"):
        Params.parse(raw)


# Fields whose default is not a setting of params.yaml: "inherit" markers and derived values.
DEFAULT_ALLOWED = {
    ("StageTaskOverride", "retries"),
    ("StageTaskOverride", "retry_delay_s"),
    ("StageTaskOverride", "timeout_s"),
}


def _models(model, seen=None):
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for f in model.model_fields.values():
        for arg in (f.annotation, *getattr(f.annotation, "__args__", ())):
            for t in (arg, *getattr(arg, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    _models(t, seen)
    return seen


def test_config_models_have_no_defaults():
    found = []
    for model in _models(Params) | _models(FlowParams):
        for name, f in model.model_fields.items():
            if not f.is_required() and (model.__name__, name) not in DEFAULT_ALLOWED:
                found.append(f"{model.__name__}.{name}")
    assert not found, f"defaults outside params.yaml: {found}"
    assert {m.__name__ for m in _models(Params) | _models(FlowParams)} >= {
        "ToyParams",
        "FlowParams",
        "TrainParams",
        "VLLMParams",
        "Variant",
    }


def _params_keys(node, out=None):
    out = set() if out is None else out
    for k, v in node.items():
        out.add(str(k))
        if isinstance(v, dict):
            _params_keys(v, out)
    return out


# (file, function or class, parameter): a default named like a params.yaml key that is not that setting.
SAME_NAME_ALLOWED = {
    ("pipeline/training/distributed.py", "Context", "strategy"),  # "none": one process, not a runtime.strategy
    ("pipeline/training/distributed.py", "Context", "offload"),  # False: one process, nothing sharded to offload
    ("pipeline/model/loading.py", "make_tiny_model", "seed"),  # a tiny random model for tests
    ("pipeline/model/loading.py", "make_tiny_model", "hidden"),
}


def test_no_default_that_params_yaml_sets_is_written_in_code():
    """A function parameter or dataclass field named like a params.yaml key may not carry its own
    default: the value must come from the typed params (params.yaml is the one source)."""
    keys = _params_keys(BASE)
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.joinpath("pipeline").rglob("*.py"), *root.joinpath("stages").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = a.posonlyargs + a.args
                pairs = list(zip(pos[len(pos) - len(a.defaults) :], a.defaults))
                pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                pairs = [(arg.arg, d) for arg, d in pairs]
            elif isinstance(node, ast.ClassDef):
                pairs = [
                    (st.target.id, st.value)
                    for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None
                ]
            for name, default in pairs:
                literal = isinstance(default, ast.Constant) and default.value is not None
                if name in keys and literal and (rel, node.name, name) not in SAME_NAME_ALLOWED:
                    found.append(f"{rel}:{default.lineno} {node.name}({name}={default.value!r})")
    assert not found, "defaults that params.yaml sets, written in code:\n" + "\n".join(found)
