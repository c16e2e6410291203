import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from repo_utils import repo_params

from pipeline.config import ConfigError, Params, load_params, parse_params

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
    p = load_params("params.yaml")
    assert set(p.variants) == {"dpo", "dpop"}
    assert p.variants["dpop"].losses[0].hp == {"beta": 0.1, "dpop_lambda": 50.0}
    assert p.variants["dpo"].settings.lr == BASE["train"]["lr"]


@pytest.mark.parametrize("path,value,key", [
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
])
def test_wrong_type_names_the_key(path, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(_with(path, value))


def test_unknown_key_is_refused():
    raw = _with("sample.temprature", 0.5)
    with pytest.raises(ConfigError, match=r"sample\.temprature"):
        parse_params(raw)


def test_missing_model_folder_fails_at_once(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.model.*does not exist"):
        parse_params(_with("policy.model", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"policy\.model.*config\.json"):
        parse_params(_with("policy.model", str(tmp_path / "empty")))


def test_variant_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.beta"):
        parse_params(_with("train.variants.dpo", {"loss": "dpo", "beta": "high"}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo: unknown loss 'no_such'"):
        parse_params(_with("train.variants.dpo", {"loss": "no_such", "beta": 0.1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpop\.dpop_lambda"):
        parse_params(_with("train.variants.dpop", {"loss": "dpop", "beta": 0.1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.lr"):
        parse_params(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "lr": -1}))
    with pytest.raises(ConfigError, match=r"train\.variants\.x\.loss"):
        parse_params(_with("train.variants", {"x": {"beta": 0.1}}))


def test_variant_overrides_and_combined_terms():
    raw = _with("train.variants", {
        "mix": {"loss": [{"name": "dpo", "beta": 0.2}, {"name": "dpo_sft", "weight": 0.5, "beta": 0.2,
                                                         "sft_weight": 1.0}], "lr": 1e-4},
    })
    v = parse_params(raw).variants["mix"]
    assert [t.name for t in v.losses] == ["dpo", "dpo_sft"]
    assert v.losses[1].weight == 0.5
    assert v.settings.lr == 1e-4 and v.settings.epochs == BASE["train"]["epochs"]


def test_reference_and_training_must_truncate_and_round_alike():
    """The reference log-probs are computed once, at reference.max_length and train.bf16: training
    (every variant) must use the same, or lp − ref is not zero before the first step."""
    raw = _with("train.max_length", BASE["reference"]["max_length"] - 32)
    with pytest.raises(ConfigError, match=r"train\.max_length: \d+ differs from reference\.max_length \d+"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.max_length: \d+ differs from reference\.max_length"):
        parse_params(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "max_length": 96}))
    bf16 = BASE["train"]["bf16"]
    with pytest.raises(ConfigError, match=r"train\.variants\.dpop\.bf16: .* differs from train\.bf16"):
        parse_params(_with("train.variants.dpop", {"loss": "dpop", "beta": 0.1, "dpop_lambda": 5.0,
                                                   "bf16": not bf16}))
    shared = BASE["train"]["shared_prompt"]
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo\.shared_prompt: .* differs from train\.shared_prompt"):
        parse_params(_with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "shared_prompt": not shared}))
    # Restating the shared values is fine; changing both sides together too.
    same = _with("train.variants.dpo", {"loss": "dpo", "beta": 0.1, "bf16": bf16,
                                        "max_length": BASE["reference"]["max_length"]})
    assert parse_params(same).variants["dpo"].settings.bf16 == bf16
    both = _with("train.max_length", 96)
    both["reference"]["max_length"] = 96
    assert parse_params(both).variants["dpo"].settings.max_length == 96


def test_reference_check_tolerance_is_a_setting():
    assert parse_params(BASE).train.ref_check_tol == BASE["train"]["ref_check_tol"] > 0
    raw = copy.deepcopy(BASE)
    del raw["train"]["ref_check_tol"]
    with pytest.raises(ConfigError, match=r"train\.ref_check_tol: Field required"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"train\.ref_check_tol"):
        parse_params(_with("train.ref_check_tol", 0))


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_unknown_train_key_is_refused():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        parse_params(_with("train.lrr", 1e-5))


def test_backends_and_scenarios_are_checked(tmp_path):
    assert parse_params(_with("sample.backend", "vllm")).sample.backend == "vllm"
    with pytest.raises(ConfigError, match=r"sample\.backend"):
        parse_params(_with("sample.backend", "tgi"))
    with pytest.raises(ConfigError, match=r"vllm\.gpu_memory_utilization"):
        parse_params(_with("vllm.gpu_memory_utilization", 1.5))
    # accuracy before and after training must come from the same decoder
    with pytest.raises(ConfigError, match=r"evaluate\.generation\.backend.*policy\.eval\.backend"):
        parse_params(_with("evaluate.generation.backend", "vllm"))
    with pytest.raises(ConfigError, match=r"sample_other\.model.*does not exist"):
        parse_params(_with("sample_other.model", str(tmp_path / "nope")))
    for k in (1, 2, 3, 4):
        assert parse_params(_with("pairs.scenario", k)).pairs.scenario == k
    raw = _with("pairs.scenario", 3)
    raw["judge"].update(backend="llm")
    raw["judge"]["llm"].update(mode="listwise")
    with pytest.raises(ConfigError, match=r"pairs\.scenario.*absolute scores"):
        parse_params(raw)


# --------------------------------------------------------------------------------------------- ground floor
def test_config_module_does_not_import_torch():
    # In a fresh interpreter: the test process itself has torch loaded by other tests.
    code = ("import sys; import pipeline.config as c; c.load_params('params.yaml'); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'prefect', "
            "'polars', 'dvc')); "
            "print(heavy); print(sorted(m for m in sys.modules if m.startswith('pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, ours = out.splitlines()
    assert heavy == "[]", heavy
    assert ours == "['pipeline', 'pipeline.config', 'pipeline.model', 'pipeline.model.builtin']", ours


def test_a_missing_key_is_named_not_defaulted():
    raw = copy.deepcopy(BASE)
    del raw["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr: Field required"):
        parse_params(raw)
    raw = copy.deepcopy(BASE)
    del raw["toy"]
    with pytest.raises(ConfigError, match=r"toy: Field required"):
        parse_params(raw)


# Fields whose default is not a setting of params.yaml: "inherit" markers and derived values.
DEFAULT_ALLOWED = {
    ("StageTaskOverride", "retries"), ("StageTaskOverride", "retry_delay_s"), ("StageTaskOverride", "timeout_s"),
    ("Params", "variants"),  # built from train.variants by parse_params
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
    for model in _models(Params):
        for name, f in model.model_fields.items():
            if not f.is_required() and (model.__name__, name) not in DEFAULT_ALLOWED:
                found.append(f"{model.__name__}.{name}")
    assert not found, f"defaults outside params.yaml: {found}"
    assert {m.__name__ for m in _models(Params)} >= {"ToyParams", "FlowParams", "TrainParams", "VLLMParams"}


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
        if rel == "pipeline/config.py":
            continue  # checked by test_config_models_have_no_defaults
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = a.posonlyargs + a.args
                pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults))
                pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                pairs = [(arg.arg, d) for arg, d in pairs]
            elif isinstance(node, ast.ClassDef):
                pairs = [(st.target.id, st.value) for st in node.body if isinstance(st, ast.AnnAssign)
                         and isinstance(st.target, ast.Name) and st.value is not None]
            for name, default in pairs:
                literal = isinstance(default, ast.Constant) and default.value is not None
                if name in keys and literal and (rel, node.name, name) not in SAME_NAME_ALLOWED:
                    found.append(f"{rel}:{default.lineno} {node.name}({name}={default.value!r})")
    assert not found, "defaults that params.yaml sets, written in code:\n" + "\n".join(found)
