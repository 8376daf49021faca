"""The stacks of infra/stacks.yaml and the cloud run configurations, checked without credentials.

What needs a cloud is not checked here: that the roles, projects and workspaces exist and that
the jobs start (infra/README.md, "Checking a stack by hand"). What is checked: every component is
a valid configuration of its ZenML flavor, the registration script names what is missing and
changes nothing on a re-run, every run configuration names step operators of its party's cloud,
the images name each side's packages, and a real pipeline run hands every party step to that
party's own step operator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from cloudfed.federation import load_run_config
from tests.e2e_support import (
    BIN,
    REPO_ROOT,
    federation,
    make_project,
    run_pipeline,
    write_config,
    zenml_env,
)

sys.path.insert(0, str(REPO_ROOT / "infra"))
import register_stacks  # noqa: E402

SPEC = register_stacks.load_spec()
EXAMPLE_ENV = register_stacks.read_env_file(REPO_ROOT / "infra" / "stacks.example.env")
CLOUD_CONFIGS = ["aws", "gcp", "azure", "multicloud"]
# The step operator flavors a party in each cloud may train on; Kubernetes runs anywhere.
HEAVY = {"aws": {"sagemaker"}, "gcp": {"vertex"}, "azure": {"azureml"}}
SCHEMES = {"aws": "s3", "gcp": "gs", "azure": "abfs"}


def _plan(stacks: list[str], env: dict[str, str]) -> register_stacks.Plan:
    return register_stacks.build_plan(SPEC, stacks, env)


def test_every_component_is_a_valid_config_of_its_flavor() -> None:
    plan = _plan(list(SPEC["stacks"]), EXAMPLE_ENV)
    assert not plan.problems, plan.problems
    assert len(plan.components) == len(SPEC["components"])  # every one is in some stack
    seen = set()
    for comp in plan.components:
        flavor = register_stacks.flavor_class(comp.type, comp.flavor)()
        assert (flavor.name, flavor.type.value) == (comp.flavor, comp.type), comp.name
        stored, why = register_stacks.validate_config(comp)
        assert why is None and stored is not None, (comp.name, why)
        seen.add((comp.type, comp.flavor))
    # What the issue asks the stacks to hold, each validated above by its flavor's config class.
    assert {
        ("step_operator", "sagemaker"),
        ("step_operator", "vertex"),
        ("step_operator", "azureml"),
        ("step_operator", "kubernetes"),
        ("artifact_store", "s3"),
        ("artifact_store", "gcp"),
        ("artifact_store", "azure"),
        ("experiment_tracker", "mlflow"),
        ("orchestrator", "kubernetes"),
        ("container_registry", "aws"),
        ("image_builder", "local"),
    } <= seen


def test_the_flavor_config_classes_need_no_cloud_sdk() -> None:
    """The check above runs where no cloud SDK is installed: in a fresh interpreter, importing
    every flavor class of the spec loads none of boto3, sagemaker, google-cloud or azure-ai-ml."""
    code = (
        "import sys; sys.path.insert(0, 'infra'); import register_stacks as r\n"
        "for t, f in r.FLAVORS: r.flavor_class(t, f)().config_class\n"
        "sdks = ('boto3', 'sagemaker', 'google.cloud.aiplatform', 'azure.ai.ml', 'kubernetes')\n"
        "print(sorted(m for m in sys.modules if m.startswith(sdks)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_component_its_flavor_refuses_is_named_with_the_field() -> None:
    spec = yaml.safe_load((REPO_ROOT / "infra" / "stacks.yaml").read_text())
    spec["components"]["vertex_bank"]["config"]["accelerator_count"] = "one"
    plan = register_stacks.build_plan(spec, ["cloudfed-multicloud"], EXAMPLE_ENV)
    assert len(plan.problems) == 1, plan.problems
    assert "components.vertex_bank" in plan.problems[0]
    assert "accelerator_count" in plan.problems[0]


def test_every_missing_input_is_named_with_its_field_and_fix() -> None:
    env = {k: v for k, v in EXAMPLE_ENV.items() if k != "CLOUDFED_BANK_GCP_PROJECT"}
    env.pop("CLOUDFED_HOSPITAL_AWS_ROLE_ARN")
    problems = _plan(["cloudfed-multicloud"], env).problems
    assert len(problems) == 2, problems
    role = next(p for p in problems if "ROLE_ARN" in p)
    assert "components.sagemaker_hospital.config.role" in role
    assert "export CLOUDFED_HOSPITAL_AWS_ROLE_ARN=" in role and "aws iam get-role" in role
    project = next(p for p in problems if "GCP_PROJECT" in p)
    assert "components.vertex_bank.config.project" in project and "gcloud projects" in project
    # A stack needs only its own components' inputs: the AWS stack has no GCP project.
    aws = _plan(["cloudfed-aws"], env).problems
    assert len(aws) == 1 and "CLOUDFED_HOSPITAL_AWS_ROLE_ARN" in aws[0], aws


def test_the_script_refuses_before_registering_anything(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "infra/register_stacks.py", "--stack", "cloudfed-gcp"],
        cwd=REPO_ROOT,
        env={k: v for k, v in zenml_env().items() if not k.startswith("CLOUDFED_")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "CLOUDFED_COORDINATOR_GCP_BUCKET" in proc.stderr
    assert "would run" not in proc.stdout and "zenml " not in proc.stdout


def test_missing_credentials_are_named_per_cloud(tmp_path: Path, monkeypatch) -> None:
    for variables, _, _ in register_stacks.CREDENTIALS.values():
        for var in variables:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    plan = _plan(["cloudfed-multicloud"], EXAMPLE_ENV)
    problems = register_stacks.check_credentials(plan, home=tmp_path)
    text = "\n".join(problems)
    assert "no aws credentials" in text and "sagemaker_hospital" in text
    assert "no gcp credentials" in text and "gcloud auth application-default login" in text
    assert "no azure credentials" in text and "az login" in text
    assert "kubeconfig" in text and "eks_hospital" in text
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\n")
    problems = register_stacks.check_credentials(plan, home=tmp_path)
    assert not any("no aws credentials" in p for p in problems)


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_each_config_names_step_operators_of_its_partys_cloud(name: str) -> None:
    cfg = load_run_config(REPO_ROOT / "configs" / f"{name}.yaml")
    stack = SPEC["stacks"][f"cloudfed-{name}"]
    for party in cfg.parties:
        heavy = SPEC["components"][party.step_operator]
        light = SPEC["components"][party.light_step_operator]
        for op, comp, flavors in (
            (party.step_operator, heavy, HEAVY[party.cloud] | {"kubernetes"}),
            (party.light_step_operator, light, {"kubernetes"}),
        ):
            assert op in stack["step_operator"], (name, party.name, op)
            assert comp["type"] == "step_operator", op
            assert comp["cloud"] == party.cloud, (name, party.name, op)
            assert comp["flavor"] in flavors, (name, party.name, op)
            assert party.name.startswith(comp["party"]), (name, party.name, op)
        # Its data, its storage and its image live in its own cloud.
        scheme = SCHEMES[party.cloud]
        for uri in (party.storage, party.raw.train, party.raw.eval):
            assert urlsplit(uri).scheme == scheme, (name, party.name, uri)
        assert party.image, (name, party.name)
    assert urlsplit(cfg.exchange).scheme in SCHEMES.values()
    assert urlsplit(cfg.coordinator_storage).scheme in SCHEMES.values()


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_each_sides_image_names_its_packages(name: str) -> None:
    from pipelines._images import coordinator_packages, party_docker_settings

    cfg = load_run_config(REPO_ROOT / "configs" / f"{name}.yaml")
    plan = _plan([f"cloudfed-{name}"], EXAMPLE_ENV)
    comps = {c.name: c for c in plan.components}
    members = plan.stacks[f"cloudfed-{name}"]
    store = comps[members["artifact_store"][0]].config["path"]
    integrations = {
        register_stacks.FLAVORS[(c.type, c.flavor)][2]
        for n in sum(members.values(), [])
        if (c := comps.get(n)) is not None
    } - {None}
    gcp = "gcp" in integrations
    need = {"aws": "s3fs", "gcp": "gcsfs", "azure": "adlfs"}
    exchange_fs = {"s3": "s3fs", "gs": "gcsfs", "abfs": "adlfs"}[urlsplit(cfg.exchange).scheme]
    for party in cfg.parties:
        docker = party_docker_settings(cfg, party.name, store, integrations)
        names = {r.split("==")[0] for r in docker.requirements}
        assert need[party.cloud] in names, (name, party.name, docker.requirements)
        assert exchange_fs in names, (name, party.name, docker.requirements)
        assert docker.parent_image == party.image and docker.skip_build
        # Beside the gcp integration's gcsfs<=2024.12.0, every filesystem of that release.
        if gcp:
            assert all(r.endswith("==2024.12.0") for r in docker.requirements), docker
    raw = yaml.safe_load((REPO_ROOT / "configs" / f"{name}.yaml").read_text())
    pipeline_reqs = set(raw["settings"]["docker"]["requirements"])
    assert set(coordinator_packages(cfg, store, integrations)) <= pipeline_reqs, name


def test_the_gcsfs_pin_applies_only_beside_gcsfs() -> None:
    from pipelines._images import party_packages

    cfg = load_run_config(REPO_ROOT / "configs" / "aws.yaml")
    assert party_packages(cfg, "hospital-aws", "s3://a/zenml", {"aws", "s3"}) == ["s3fs"]
    assert party_packages(cfg, "hospital-aws", "gs://a/zenml", {"aws", "s3"}) == [
        "gcsfs==2024.12.0",
        "s3fs==2024.12.0",
    ]


# --- one real pipeline run on credential-free stand-in step operators ------------------------

STAND_IN_SPEC = """
components:
  op_hospital:
    type: step_operator
    flavor: stand_in
    cloud: aws
    party: hospital
    config: {record_file: "${STAND_IN_RECORD}"}
  op_bank:
    type: step_operator
    flavor: stand_in
    cloud: gcp
    party: bank
    config: {record_file: "${STAND_IN_RECORD}"}
  op_hospital_light:
    type: step_operator
    flavor: stand_in
    cloud: aws
    party: hospital
    config: {record_file: "${STAND_IN_RECORD}"}
stacks:
  cloudfed-stand-in:
    orchestrator: default
    artifact_store: default
    experiment_tracker: mlflow_local
    step_operator: [op_hospital, op_bank, op_hospital_light]
"""
OPERATORS = {"hospital-aws": "op_hospital", "bank-gcp": "op_bank"}
# The hospital's protocol stages run on its light operator; the bank has none (its own runs all).
LIGHT = {"hospital-aws": "op_hospital_light"}


def _register(project: Path, spec: Path, record: Path) -> subprocess.CompletedProcess[str]:
    env = zenml_env() | {"STAND_IN_RECORD": str(record)}
    return subprocess.run(
        [sys.executable, str(project / "infra" / "register_stacks.py"), "--spec", str(spec)]
        + ["--skip-credential-check", "--activate", "cloudfed-stand-in"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def stand_in_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cloudfed.data.demo import generate_demo

    work = tmp_path_factory.mktemp("stacks")
    clouds = work / "clouds"
    generate_demo(clouds, seed=5)
    project = make_project(work / "project")
    (project / "tests").mkdir()
    (project / "tests" / "__init__.py").write_text("")
    (project / "tests" / "stand_in_step_operator.py").write_text(
        (REPO_ROOT / "tests" / "stand_in_step_operator.py").read_text()
    )
    subprocess.run(
        [str(BIN / "zenml"), "step-operator", "flavor", "register"]
        + ["tests.stand_in_step_operator.StandInStepOperatorFlavor"],
        cwd=project,
        env=zenml_env(),
        check=True,
        capture_output=True,
    )
    spec, record = work / "stacks.yaml", work / "submitted.jsonl"
    spec.write_text(STAND_IN_SPEC)
    first, again = _register(project, spec, record), _register(project, spec, record)
    fed = federation(work, clouds, list(OPERATORS), rounds=1)
    fed["protection"] = {"default": "plaintext", "public_tensors": ["*"]}  # fewest party steps
    for party in fed["parties"]:
        party["cloud"] = party["name"].split("-")[1]
        party["step_operator"] = OPERATORS[party["name"]]
        party["light_step_operator"] = LIGHT.get(party["name"])
    config = write_config(work / "run.yaml", fed)
    proc = run_pipeline(project, config)
    return {
        "work": work,
        "proc": proc,
        "first": first,
        "again": again,
        "record": record,
        "config": config,
    }


@pytest.mark.e2e
def test_registering_twice_changes_nothing(stand_in_run: dict) -> None:
    first, again = stand_in_run["first"], stand_in_run["again"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "zenml step-operator register op_hospital --flavor=stand_in" in first.stdout
    assert "zenml stack register cloudfed-stand-in" in first.stdout
    assert again.returncode == 0, again.stdout + again.stderr
    assert "zenml " not in again.stdout.replace("zenml stack set", ""), again.stdout
    assert again.stdout.count("unchanged:") == 4  # three operators and the stack


@pytest.mark.e2e
def test_each_party_step_ran_on_its_own_partys_operator(stand_in_run: dict) -> None:
    from zenml.client import Client

    proc = stand_in_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = Client().get_pipeline("federated_training").last_run
    recorded = {}
    for name, step in run.steps.items():
        party = next((p for p in OPERATORS if p in name), None)
        recorded[name] = step.config.step_operator
        if party is None:  # the coordinator's steps stay on the orchestrator
            assert step.config.step_operator is None, name
            continue
        light = name.startswith("upload_")  # plaintext rounds: upload is the protocol stage
        want = LIGHT.get(party, OPERATORS[party]) if light else OPERATORS[party]
        assert step.config.step_operator == want, name
        docker = step.config.docker_settings
        assert docker.required_integrations == (["aws", "s3"] if "aws" in party else ["gcp"])
    party_steps = {n for n, op in recorded.items() if op}
    assert {f"train_{p}_r1" for p in OPERATORS} <= party_steps
    assert {f"harmonize_{p}" for p in OPERATORS} <= party_steps
    assert recorded["upload_hospital-aws_r1"] == "op_hospital_light"
    assert recorded["evaluate_hospital-aws_r1"] == "op_hospital"  # loads the model: heavy
    # ...and each went through that operator: what the stand-in saw, step by step.
    lines = stand_in_run["record"].read_text().splitlines()
    submitted = {d["step"]: d["operator"] for d in map(json.loads, lines)}
    assert submitted == {n: recorded[n] for n in party_steps}
