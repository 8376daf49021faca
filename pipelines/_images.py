"""What each side's image holds: its URIs' fsspec filesystems and its own cloud's integration.

Never another cloud's. Why per side: ZenML's gcp integration pins `gcsfs<=2024.12.0`, and gcsfs
pins fsspec to its own release, which current s3fs (pinned to its own release) does not accept:
one image with all three clouds' integrations does not resolve. So each party's image gets its
own cloud's integration, and any other fsspec filesystem it needs (the exchange, the artifact
store) at the release its cloud's integration allows; `install_stack_requirements` is off because
a multi-cloud stack's requirements are all three clouds'.

Why prebuilt: in a dynamic pipeline ZenML 0.98 builds images only from the pipeline's settings
(and `depends_on` templates); a step's own Docker settings are honoured only with `skip_build`
and a `parent_image`. A party with `image:` gets exactly that; without one its steps run in the
pipeline's image and ZenML warns that the step's settings are ignored.

    python -m pipelines._images configs/multicloud.yaml   # what to build, per party
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from zenml.config import DockerSettings

from cloudfed.federation import FederationConfig, load_run_config

# fsspec protocol -> the package that implements it.
FILESYSTEMS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "az": "adlfs",
}
# A party cloud -> its ZenML integration (step operator, registry, fsspec filesystem).
INTEGRATIONS = {"aws": ["aws", "s3"], "gcp": ["gcp"], "azure": ["azure"]}
# The fsspec release ZenML's gcp integration allows (`gcsfs<=2024.12.0`); in a GCP image every
# other fsspec filesystem must be of the same release, or pip cannot resolve the image.
GCP_FSSPEC_RELEASE = "2024.12.0"
# What the coordinator's steps run with besides the filesystems: MLflow (its tracker).
COORDINATOR_INTEGRATIONS = ["mlflow"]


def _filesystems(uris: list[str | None]) -> set[str]:
    schemes = {urlsplit(u).scheme for u in uris if u}
    return {FILESYSTEMS[s] for s in schemes if s in FILESYSTEMS}


def _pinned(packages: set[str], integrations: list[str]) -> list[str]:
    """Beside the gcp integration, every fsspec filesystem at the release it allows."""
    if "gcp" not in integrations:
        return sorted(packages)
    return sorted(f"{p}=={GCP_FSSPEC_RELEASE}" for p in packages)


def party_integrations(cfg: FederationConfig, party: str) -> list[str]:
    return list(INTEGRATIONS.get(cfg.party(party).cloud, []))


def party_packages(
    cfg: FederationConfig, party: str, artifact_store: str | None = None
) -> list[str]:
    """Filesystems of the party's storage, raw sources, the exchange and the artifact store."""
    p = cfg.party(party)
    uris = [p.storage, p.raw.train, p.raw.eval, cfg.exchange, artifact_store]
    return _pinned(_filesystems(uris), party_integrations(cfg, party))


def party_docker_settings(
    cfg: FederationConfig, party: str, artifact_store: str | None = None
) -> DockerSettings:
    image = cfg.party(party).image
    return DockerSettings(
        required_integrations=party_integrations(cfg, party),
        requirements=party_packages(cfg, party, artifact_store),
        install_stack_requirements=False,
        parent_image=image,
        skip_build=image is not None,
    )


def coordinator_packages(cfg: FederationConfig, artifact_store: str | None = None) -> list[str]:
    """The coordinator never opens a party's storage: the exchange, its own, the artifacts."""
    uris = [cfg.exchange, cfg.coordinator_storage, artifact_store]
    return sorted(_filesystems(uris))


def build_commands(cfg: FederationConfig) -> list[str]:
    """One `docker build` per party with an image (infra/party.Dockerfile)."""
    out = []
    for p in cfg.parties:
        if p.image is None:
            continue
        packages = " ".join(party_packages(cfg, p.name))
        integrations = " ".join(party_integrations(cfg, p.name))
        out.append(
            f"docker build -f infra/party.Dockerfile -t {p.image} "
            f'--build-arg INTEGRATIONS="{integrations}" --build-arg PACKAGES="{packages}" .'
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipelines._images <run config>")
    print("\n".join(build_commands(load_run_config(sys.argv[1]))))
