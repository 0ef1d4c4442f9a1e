"""One run, one spec: a flow run follows its settings parameter, never its machine's LORAFLOW_*
variables (bar the storage location, taken whole when the spec leaves it unset), and a worker's run
never falls back to a machine-local store. One rule (settings field metadata) says which settings
change a result, for the change check, the resume identity and the data fingerprint."""

from __future__ import annotations

import logging

import pytest

from loraflow.errors import ConfigError
from loraflow.run_spec import for_flow_run
from loraflow.settings import Settings, StorageSettings, load_settings, result_fields


@pytest.fixture
def worker_env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith(("LORAFLOW_", "AWS_")) and name != "LORAFLOW_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("LORAFLOW_TRAINING__MAX_STEPS", "7")
    monkeypatch.setenv("LORAFLOW_LORA__R", "2")
    return monkeypatch


def test_a_partial_spec_means_the_documented_defaults_not_this_machines_environment(worker_env):
    spec = Settings.model_validate({"training": {"logging_steps": 3}})
    assert (spec.training.max_steps, spec.lora.r, spec.training.logging_steps) == (1000, 16, 3)
    # The one reader of the environment is load_settings, for whoever starts a run.
    assert (load_settings().training.max_steps, load_settings().lora.r) == (7, 2)
    assert isinstance(load_settings(), Settings) and type(load_settings()) is Settings


def test_a_worker_run_takes_the_location_whole_and_names_the_variables_it_ignores(worker_env, caplog):
    worker_env.setenv("LORAFLOW_STORAGE__ENDPOINT_URL", "http://store.internal:9000")
    worker_env.setenv("LORAFLOW_STORAGE__BUCKET", "worker-bucket")
    worker_env.setenv("LORAFLOW_STORAGE__PREFIX", "team-a/")
    with caplog.at_level(logging.INFO, logger="loraflow"):
        spec = for_flow_run(Settings.model_validate({"training": {"max_steps": 3}}), on_worker=True)
    assert (spec.storage.endpoint_url, spec.storage.bucket, spec.storage.prefix) == \
        ("http://store.internal:9000", "worker-bucket", "team-a/")
    assert (spec.training.max_steps, spec.lora.r) == (3, 16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "LORAFLOW_LORA__R, LORAFLOW_TRAINING__MAX_STEPS" in warnings[0]
    assert "LORAFLOW_STORAGE" not in warnings[0]  # the location was taken, not ignored

    # A spec that names its location keeps it whole: nothing of the worker's is mixed in.
    given = Settings.model_validate({"storage": {"endpoint_url": "http://other:9000", "bucket": "spec-bucket"}})
    spec = for_flow_run(given, on_worker=True)
    assert (spec.storage.endpoint_url, spec.storage.bucket, spec.storage.prefix) == ("http://other:9000", "spec-bucket", "")


@pytest.mark.parametrize("spec_storage, env, needle", [
    ({}, {}, "no storage location"),
    ({}, {"LORAFLOW_STORAGE__ENDPOINT_URL": "local"}, "no storage location"),
    ({"endpoint_url": "local"}, {}, "storage.endpoint_url=local"),
    ({"bucket": "mine"}, {"LORAFLOW_STORAGE__ENDPOINT_URL": "http://store:9000"}, "storage.bucket is set but"),
])
def test_a_worker_run_never_guesses_its_store(worker_env, spec_storage, env, needle):
    for name, value in env.items():
        worker_env.setenv(name, value)
    # AWS credentials alone (an instance role's machine looks the same) do not make a location.
    worker_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    with pytest.raises(ConfigError) as info:
        for_flow_run(Settings.model_validate({"storage": spec_storage}), on_worker=True)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_an_interactive_run_keeps_the_local_store_fallback(worker_env):
    spec = for_flow_run(Settings(), on_worker=False)
    assert spec.storage == StorageSettings()  # unset: loraflow.storage.client falls back to the local store


def test_submission_sends_the_whole_spec_and_the_location_whole_or_not_at_all(worker_env, tmp_path):
    from loraflow.cli.submit import deployment_parameters

    own = {"settings": {"training": {"max_steps": 5}, "prefect": {"train_deployment": "train-adapter/train-adapter"}}}
    sent = deployment_parameters(None, ["lora.lora_alpha=8"], own)["settings"]
    assert "storage" not in sent  # the workers' environment names the whole location
    assert sent["training"]["max_steps"] == 5 and sent["lora"]["r"] == 2  # this shell's LORAFLOW_LORA__R
    assert sent["lora"]["lora_alpha"] == 8 and sent["prefect"]["train_deployment"] == "train-adapter/train-adapter"
    Settings.model_validate(sent)  # complete and valid

    config = tmp_path / "c.yaml"
    config.write_text("storage: {bucket: mine}\n")
    with pytest.raises(ConfigError, match="storage.bucket is set but storage.endpoint_url is not"):
        deployment_parameters(str(config), [], own)
    config.write_text("storage: {endpoint_url: 'http://store:9000', bucket: mine}\n")
    sent = deployment_parameters(str(config), [], own)["settings"]
    assert sent["storage"]["endpoint_url"] == "http://store:9000" and sent["storage"]["bucket"] == "mine"
    assert sent["prefect"]["train_deployment"] == "train-adapter/train-adapter"  # the deployment's routing kept


def test_one_rule_decides_what_changes_a_result():
    from loraflow.changes import training_settings

    changes = result_fields(Settings())
    resume = result_fields(Settings(), leave_out=("inert", "schedule", "resolved"))
    assert "training.learning_rate" in changes and "training.learning_rate" in resume
    assert "training.output_dir" not in changes and "training.logging_steps" not in changes
    assert "training.max_steps" in changes and "training.max_steps" not in resume  # resume may extend a run
    assert "training.precision" in changes and "training.precision" not in resume  # resume compares the resolved one
    flat = {f"{section}.{k}" for section, fields in training_settings(Settings()).items() for k in fields}
    assert flat == set(changes)


def test_set_beats_a_deployments_own_settings(worker_env):
    from loraflow.cli.submit import deployment_parameters

    own = {"settings": {"training": {"max_steps": 120, "logging_steps": 10}}}
    sent = deployment_parameters(None, ["training.max_steps=10"], own)["settings"]
    assert sent["training"]["max_steps"] == 10 and sent["training"]["logging_steps"] == 10
