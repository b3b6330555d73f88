"""The validating admission webhook's TLS material and, in url mode, its registration.

kopf's webhook server (aiohttp, TLS) serves the `@kopf.on.validate` handler. One owner per mode for the
certificate and the ValidatingWebhookConfiguration:

* ``service`` (real clusters): the helm chart owns both. It creates the CA and serving certificate (a Secret
  that each operator pod mounts: ``load``), the Service and the configuration with the CA as ``caBundle``. The
  operator only serves; it neither reads Secrets through the API nor writes webhook configurations.
* ``url`` (the project's local cluster only, where the apiserver reaches pods by IP and no Service): each
  operator pod makes its own CA and certificate in memory (``generate``) and registers
  ``clientConfig.url = https://<its IP>:<port>/<path>`` with that CA in the configuration (``register``).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pypto_serving.contract import APP, L_MANAGED_BY, L_NAME, MANAGER
from pypto_serving.kube import ApiError, Kube
from pypto_serving.operator.types import GROUP, PLURAL, VERSION

log = logging.getLogger("pypto_serving.operator.webhook")
HANDLER_ID = "validate-pyptoserving"  # kopf routes POST /<handler id> to the handler
WEBHOOK_NAME = f"validate.{PLURAL}.{GROUP}"
CERT_DAYS = 3650
RENEW_BEFORE_DAYS = 30
VWC_API, VWC_KIND = "admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"
MANAGED_BY = L_MANAGED_BY  # on the configurations it creates, with the value MANAGER


@dataclass(frozen=True)
class TLSBundle:
    """PEM CA certificate, serving certificate and its private key."""

    ca: bytes
    cert: bytes
    key: bytes

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """Write ca.crt, tls.crt and tls.key (0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
        for path, data in zip(paths, (self.ca, self.cert, self.key), strict=True):
            path.write_bytes(data)
        paths[2].chmod(0o600)
        return paths


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate(hosts: Sequence[str], days: int = CERT_DAYS) -> TLSBundle:
    """A new self-signed CA and a serving certificate for ``hosts`` (IPs and DNS names) signed by it."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{MANAGER}-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return TLSBundle(
        ca=ca.public_bytes(pem), cert=cert.public_bytes(pem),
        key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def covers(bundle: TLSBundle, hosts: Sequence[str], now: dt.datetime | None = None) -> bool:
    """Whether the bundle's certificate is valid long enough and names every host."""
    cert = x509.load_pem_x509_certificate(bundle.cert)
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc - now < dt.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(host in names for host in hosts)


def load(directory: Path) -> TLSBundle:
    """The bundle the chart mounts (its Secret's ca.crt, tls.crt and tls.key); ValueError names what is missing."""
    try:
        return TLSBundle(*((directory / name).read_bytes() for name in ("ca.crt", "tls.crt", "tls.key")))
    except OSError as exc:
        raise ValueError(f"the webhook certificate is not in {directory} ({exc.strerror}: {exc.filename}); "
                         "service mode serves the Secret the chart mounts there") from None


def client_config(ca: bytes, host: str = "127.0.0.1", port: int = 9443) -> dict[str, Any]:
    """The url-mode clientConfig: ``https://<host>:<port>/<handler>`` trusting ``ca``."""
    url_host = f"[{host}]" if ":" in host else host
    return {"url": f"https://{url_host}:{port}/{HANDLER_ID}", "caBundle": base64.b64encode(ca).decode()}


def configuration(name: str, config: dict[str, Any], failure_policy: str = "Fail") -> dict[str, Any]:
    """The ValidatingWebhookConfiguration for PyptoServing CREATE and UPDATE."""
    return {
        "apiVersion": VWC_API, "kind": VWC_KIND,
        "metadata": {"name": name, "labels": {L_NAME: APP}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": config,
            "rules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "operations": ["CREATE", "UPDATE"],
                       "resources": [PLURAL], "scope": "Namespaced"}],
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1", "v1beta1"],
            "timeoutSeconds": 10,
        }],
    }


def merged(current: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """Pure: ``current`` (the stored configuration) with the operator's part of ``body`` written into it.

    The operator owns its webhooks (by name: their clientConfig with the caBundle, rules, policies) and the
    labels it sets; everything else is kept: metadata it does not own (helm's ``app.kubernetes.io/managed-by``
    and ``meta.helm.sh/*``, other labels and annotations, owner references), webhooks with other names, and fields
    of its own webhooks that it does not set (e.g. an admin's ``namespaceSelector``).
    """
    out = copy.deepcopy(current)
    meta = out.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **(body["metadata"].get("labels") or {})}
    ours = {hook["name"]: hook for hook in body.get("webhooks") or []}
    hooks = []
    for hook in out.get("webhooks") or []:
        mine = ours.pop(hook.get("name"), None)
        hooks.append(hook if mine is None else {**hook, **copy.deepcopy(mine)})
    out["webhooks"] = hooks + [copy.deepcopy(hook) for hook in ours.values()]
    return out


def without(current: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Pure: ``current`` without the webhooks named in ``names``."""
    out = copy.deepcopy(current)
    out["webhooks"] = [hook for hook in out.get("webhooks") or [] if hook.get("name") not in names]
    return out


def register(kube: Kube, body: dict[str, Any]) -> None:
    """Create the ValidatingWebhookConfiguration, or merge ``body``'s webhooks and labels into the existing one
    (`merged`: helm's ownership labels and annotations and anything else the operator does not own survive).

    A configuration the operator creates carries ``app.kubernetes.io/managed-by: pypto-serving-operator``, so
    `unregister` knows it may delete it."""
    for _ in range(5):
        current = kube.get(VWC_API, VWC_KIND, body["metadata"]["name"])
        try:
            if current is None:
                created = copy.deepcopy(body)
                created["metadata"].setdefault("labels", {})[MANAGED_BY] = MANAGER
                kube.create(created)
            else:
                update = merged(current, body)
                if update != current:
                    kube.replace(update)  # carries current's resourceVersion: a concurrent write is a 409
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"could not register the webhook configuration {body['metadata']['name']}")


def unregister(kube: Kube, name: str, config: dict[str, Any]) -> None:
    """Remove this operator's webhook if it still points at ``config`` (another replica may have taken it over):
    the whole configuration when the operator created it, else (e.g. helm owns it) only its webhook entry."""
    try:
        current = kube.get(VWC_API, VWC_KIND, name)
        hooks = [hook for hook in (current or {}).get("webhooks") or [] if hook.get("name") == WEBHOOK_NAME]
        if current is None or not hooks or hooks[0].get("clientConfig", {}).get("url") != config.get("url"):
            return
        if ((current.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) == MANAGER:
            kube.delete(VWC_API, VWC_KIND, name)
            log.info("removed the webhook configuration %s", name)
        else:
            kube.replace(without(current, {WEBHOOK_NAME}))
            log.info("removed webhook %s from the configuration %s (not the operator's to delete)", WEBHOOK_NAME,
                     name)
    except Exception as exc:
        log.warning("could not remove the webhook configuration %s: %r", name, exc)
