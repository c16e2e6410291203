"""Loading models: the builtin offline model (converted once from its GGUF file, also under concurrent
callers) and policy folders."""

from pipeline.model import loading


def test_builtin_conversion_runs_once_under_concurrent_callers(tmp_path, monkeypatch):
    """Parallel experiments (or test workers) on a fresh machine: one converts, the others reuse it."""
    import threading
    import time

    monkeypatch.setenv("DPO_PIPELINE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(name, builtin, gguf_dir, target):
        calls.append(name)
        time.sleep(0.5)  # long enough for the other callers to arrive while this one works
        with loading.atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    results, errors = [], []

    def call():
        try:
            results.append(loading.convert_builtin("smollm2-135m-instruct"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == ["smollm2-135m-instruct"]
    assert len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_a_policy_folder_loads_as_model_and_tokenizer(tiny_model_dir):
    """The stages' one way to load a policy: the model in the asked dtype, its tokenizer with a pad token."""
    import torch

    model, tok = loading.load_policy(tiny_model_dir, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tok.pad_token_id is not None and model.config.vocab_size == len(tok)
