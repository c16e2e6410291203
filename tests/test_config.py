import copy

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params

BASE = yaml.safe_load(open("params.yaml"))


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
    with pytest.raises(ConfigError, match=r"train\.variants\.dpo.*unknown loss|no_such"):
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
