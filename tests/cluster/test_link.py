"""The TLS files of the link to NATS: each unusable one is one sentence (never a prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from securemsg.errors import ConfigError
from securemsg.server.cluster.link import ClusterSettings, nats_tls_context


def settings(**tls: Any) -> ClusterSettings:
    return ClusterSettings(servers=["tls://127.0.0.1:4222"], node="n", address="", **tls)


def test_no_ca_and_no_certificate_leave_tls_to_nats_py() -> None:
    assert nats_tls_context(settings()) is None


def test_a_ca_and_a_certificate_make_a_context(tls_files: Any) -> None:
    context = nats_tls_context(
        settings(
            ca=str(tls_files.ca_pem), cert=str(tls_files.alice_cert), key=str(tls_files.alice_key)
        )
    )
    assert context is not None and context.check_hostname


def test_unusable_tls_files_are_one_sentence_each(tls_files: Any, tmp_path: Path) -> None:
    locked = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(tls_files.alice_key.read_bytes(), password=None)
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    cases = [
        ({"ca": str(tmp_path / "nowhere.pem")}, "cluster_ca file .*nowhere.pem does not exist$"),
        ({"ca": str(tmp_path / "garbage.pem")}, "cluster_ca file .*garbage.pem cannot be used"),
        (
            {"cert": str(tls_files.alice_cert), "key": str(locked)},
            "cluster_key .*locked.key is encrypted; securemsg needs an unencrypted key$",
        ),
    ]
    for given, said in cases:
        with pytest.raises(ConfigError, match=f"^{said}"):
            nats_tls_context(settings(**given))
