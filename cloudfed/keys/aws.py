"""AWS Secrets Manager as a party's key source (policy `keys.secret_manager: aws`).

boto3 comes with the AWS integration of the party's own image; it is imported only here.
"""

from __future__ import annotations

from typing import Any


class AwsSecretsManager:
    """`options` go to `boto3.client("secretsmanager", ...)`: region_name, endpoint_url."""

    def __init__(self, **options: Any) -> None:
        import boto3

        self.client = boto3.client("secretsmanager", **options)

    def read(self, secret_id: str) -> str | None:
        try:
            return self.client.get_secret_value(SecretId=secret_id)["SecretString"]
        except self.client.exceptions.ResourceNotFoundException:
            return None

    def write(self, secret_id: str, value: str) -> None:
        try:
            self.client.put_secret_value(SecretId=secret_id, SecretString=value)
        except self.client.exceptions.ResourceNotFoundException:
            self.client.create_secret(Name=secret_id, SecretString=value)

    def delete(self, secret_id: str) -> None:
        """Gone now, every version with it: no recovery window.

        A deprecated version stays readable by VersionId, and a plain delete_secret keeps every
        version restorable for 7 to 30 days.
        """
        try:
            self.client.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)
        except self.client.exceptions.ResourceNotFoundException:
            pass
