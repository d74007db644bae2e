"""The ``kafka`` section of topology.yaml: where the cluster is and how to reach it.

Its own module because the security settings carry their own rules (which settings go
together, secrets as `SecretStr`); `pipeline.config.topology` re-exports every name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["KafkaSettings", "KafkaValue", "SchemaRegistrySettings", "SecuritySettings"]

KafkaValue = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SecuritySettings(_Strict):
    """How to reach and authenticate to the cluster: TLS, mutual TLS and SASL.

    Passed to librdkafka (`pipeline.kafka.clients`); every client kp-pipeline makes uses
    the same settings, and `pipeline.kafka.preflight` checks them once at start. Secrets
    (the SASL password, the key's password) are `SecretStr`: shown as ``**********``
    wherever a setting is printed, and read only where librdkafka is configured.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """security.protocol: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    """The SASL mechanism; required with a SASL protocol."""
    sasl_username: str | None = None
    """The SASL user (PLAIN, SCRAM)."""
    sasl_password: SecretStr | None = None
    """The SASL password (PLAIN, SCRAM); never printed. ${VAR} reads it from the environment."""
    ssl_ca_location: str | None = Field(
        None, description="CA certificate(s) (PEM) that sign the brokers' certificates."
    )
    ssl_certificate_location: str | None = Field(
        None, description="This client's certificate (PEM), for mutual TLS."
    )
    ssl_key_location: str | None = Field(
        None, description="The private key (PEM) of ssl_certificate_location."
    )
    ssl_key_password: SecretStr | None = None
    """The password of ssl_key_location, if the key is encrypted; never printed."""
    ssl_endpoint_identification: Literal["https", "none"] = Field(
        "https",
        description="'https': the broker's certificate must name the host connected to "
        "(librdkafka's default); 'none' turns the check off.",
    )

    @field_validator(
        "sasl_mechanism",
        "sasl_username",
        "sasl_password",
        "ssl_ca_location",
        "ssl_certificate_location",
        "ssl_key_location",
        "ssl_key_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """'' is not set: a topology reads these from ``${VAR:-}`` (the Helm chart does)."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _complete(self) -> SecuritySettings:
        sasl = self.protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"protocol {self.protocol} needs sasl_mechanism")
        if sasl and self.sasl_mechanism != "OAUTHBEARER":
            for name in ("sasl_username", "sasl_password"):
                if getattr(self, name) is None:
                    raise ValueError(f"{self.sasl_mechanism} needs {name}")
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ValueError(f"sasl_* settings need a SASL protocol, not {self.protocol}")
        tls = [
            name
            for name in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")
            if getattr(self, name)
        ]
        if tls and not self.protocol.endswith("SSL"):
            raise ValueError(f"{tls[0]} needs protocol SSL or SASL_SSL, not {self.protocol}")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ValueError("ssl_certificate_location and ssl_key_location go together")
        return self

    def missing_files(self) -> list[str]:
        """``name: path`` of each TLS file setting whose file does not exist here.

        Checked when a client starts (`pipeline.kafka.preflight`), not when a topology is
        read: ``validate`` and the Helm chart's tests read topologies whose certificates
        live only in the pods.
        """
        names = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")
        return [
            f"{name}: no file {getattr(self, name)!r}"
            for name in names
            if getattr(self, name) and not Path(getattr(self, name)).is_file()
        ]


class SchemaRegistrySettings(_Strict):
    """With a registry, values use the Confluent wire format (magic byte + schema id)."""

    url: str
    """The Schema Registry's base URL (http or https)."""
    username: str | None = None
    """Basic-auth user for the registry."""
    password: SecretStr | None = None
    """Basic-auth password for the registry; never printed."""


class KafkaSettings(_Strict):
    """Where the cluster is and how to talk to it."""

    bootstrap_servers: str = Field(
        "embedded",
        description="'embedded' starts a Tansu broker on loopback for this run; "
        "anything else is a librdkafka bootstrap list used as given.",
    )
    group_id: str = "kp-pipeline"
    """The consumer group every replica joins; its committed offsets are the progress."""
    client_id: str = "kp-pipeline"
    """librdkafka's client.id: how this pipeline's clients appear in broker logs and quotas."""
    security: SecuritySettings = SecuritySettings()
    schema_registry: SchemaRegistrySettings | None = None
    consumer: dict[str, KafkaValue] = Field(
        default_factory=dict, description="Extra librdkafka consumer properties."
    )
    producer: dict[str, KafkaValue] = Field(
        default_factory=dict, description="Extra librdkafka producer properties."
    )
    transactional_id: str | None = Field(
        None,
        description="exactly_once: this replica's transactional id. Default "
        "'<group_id>-<replica id>', the replica id from --replica-id, KP_REPLICA_ID or the "
        "host name. It must be the same after a restart (a StatefulSet's pod name is), so "
        "the restarted replica fences its zombie and aborts what it left open.",
    )
    static_membership: bool = Field(
        False,
        description="Join the group as a static member named by the replica id "
        "(group.instance.id): a replica restarted under the same name takes its partitions "
        "back without a rebalance. A stopped static member keeps its partitions until "
        "session.timeout.ms passes. Needs unique replica ids (--replica-id, KP_REPLICA_ID).",
    )
    transaction_timeout_ms: int = Field(
        60_000,
        ge=1000,
        description="exactly_once: the broker aborts a transaction left open this long "
        "(a replica that died and never came back).",
    )

    @property
    def embedded(self) -> bool:
        """Whether this run starts its own broker."""
        return self.bootstrap_servers == "embedded"
