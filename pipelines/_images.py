"""What each side's image holds: its URIs' fsspec filesystems, pinned to resolve with the stack.

ZenML loads every component of the active stack in each step's container (Stack.from_model in
the step operator's entrypoint), so every image of a multi-cloud stack needs every component's
integration importable: a party's image cannot hold only its own cloud's. What does differ per
side is the filesystems, and their pins: ZenML's gcp integration pins `gcsfs<=2024.12.0`, and
gcsfs pins fsspec to its own release, while current s3fs needs a newer fsspec (each s3fs pins
its own release). Unpinned, pip backtracks through s3fs releases, or fails where a current s3fs
is asked for; so wherever gcsfs is in an image, every fsspec filesystem is pinned to its release.

Why prebuilt: in a dynamic pipeline ZenML 0.98 builds images only from the pipeline's settings
(and `depends_on` templates); a step's own Docker settings are honoured only with `skip_build`
and a `parent_image`. A party with `image:` gets exactly that; without one its steps run in the
pipeline's image and ZenML warns that the step's settings are ignored.

    python -m pipelines._images configs/multicloud.yaml cloudfed-multicloud   # what to build
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from zenml.config import DockerSettings
from zenml.enums import StackComponentType

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
# A party cloud -> its ZenML integrations (step operator, registry, fsspec filesystem).
INTEGRATIONS = {"aws": ["aws", "s3"], "gcp": ["gcp"], "azure": ["azure"]}
# The fsspec release ZenML's gcp integration allows (`gcsfs<=2024.12.0`).
GCP_FSSPEC_RELEASE = "2024.12.0"


def _filesystems(uris: list[str | None]) -> set[str]:
    schemes = {urlsplit(u).scheme for u in uris if u}
    return {FILESYSTEMS[s] for s in schemes if s in FILESYSTEMS}


def _pinned(packages: set[str], integrations: set[str]) -> list[str]:
    """Beside gcsfs (the gcp integration's or the URIs'), every filesystem at its release."""
    if "gcp" not in integrations and "gcsfs" not in packages:
        return sorted(packages)
    return sorted(f"{p}=={GCP_FSSPEC_RELEASE}" for p in packages)


def stack_facts(stack: str | None = None) -> dict[str, Any]:
    """A stack's artifact store and integrations: what every step's image also needs.

    The active stack's by default (the run's), or the named one's (`build_commands`); read from
    the registered stack, so no component is loaded for it.
    """
    from zenml.client import Client

    client = Client()
    model = client.active_stack_model if stack is None else client.get_stack(stack)
    components = model.components
    store = components[StackComponentType.ARTIFACT_STORE][0]
    return {
        "artifact_store": store.configuration.get("path"),
        "stack_integrations": sorted(
            {c.integration for cs in components.values() for c in cs if c.integration}
        ),
    }


def party_integrations(cfg: FederationConfig, party: str) -> list[str]:
    return list(INTEGRATIONS.get(cfg.party(party).cloud, []))


def party_packages(
    cfg: FederationConfig,
    party: str,
    artifact_store: str | None = None,
    stack_integrations: Iterable[str] = (),
) -> list[str]:
    """Filesystems of the party's storage, raw sources, the exchange and the artifact store."""
    p = cfg.party(party)
    uris = [p.storage, p.raw.train, p.raw.eval, cfg.exchange, artifact_store]
    integrations = {*stack_integrations, *party_integrations(cfg, party)}
    return _pinned(_filesystems(uris), integrations)


def party_docker_settings(
    cfg: FederationConfig,
    party: str,
    artifact_store: str | None = None,
    stack_integrations: Iterable[str] = (),
) -> DockerSettings:
    """The party's own image if it names one (prebuilt: ZenML honours nothing else here)."""
    image = cfg.party(party).image
    return DockerSettings(
        required_integrations=party_integrations(cfg, party),
        requirements=party_packages(cfg, party, artifact_store, stack_integrations),
        parent_image=image,
        skip_build=image is not None,
    )


def coordinator_packages(
    cfg: FederationConfig, artifact_store: str | None = None, stack_integrations: Iterable[str] = ()
) -> list[str]:
    """The coordinator never opens a party's storage: the exchange, its own, the artifacts."""
    uris = [cfg.exchange, cfg.coordinator_storage, artifact_store]
    return _pinned(_filesystems(uris), set(stack_integrations))


def build_commands(cfg: FederationConfig, stack: str) -> list[str]:
    """How to build each party's image (infra/party.Dockerfile) with the stack's requirements."""
    out = [
        f"zenml stack export-requirements {stack} --output-file .cloudfed/stack-requirements.txt "
        "--overwrite"
    ]
    facts = stack_facts(stack)
    for p in cfg.parties:
        if p.image is None:
            continue
        packages = " ".join(party_packages(cfg, p.name, **facts))
        out.append(
            f'docker build -f infra/party.Dockerfile --build-arg PACKAGES="{packages}" '
            f"-t {p.image} . && docker push {p.image}"
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m pipelines._images <run config> <stack name>")
    print("\n".join(build_commands(load_run_config(sys.argv[1]), sys.argv[2])))
