"""`pypto-serving operator`: run the PyptoServing operator (kopf) with health/metrics, webhook and leader election."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

import kopf

from pypto_serving.contract import ENV_POD_IP, ENV_POD_NAMESPACE, MANAGER
from pypto_serving.kube import Kube, load_config
from pypto_serving.operator import types as t
from pypto_serving.operator import webhook as wh
from pypto_serving.operator.actuator import Actuator
from pypto_serving.operator.control import load_key
from pypto_serving.operator.controller import Controller, ControllerConfig
from pypto_serving.operator.defaults import DEFAULT_ENGINE_CPU_LIMIT, DEFAULT_ENGINE_CPU_REQUEST, OperatorDefaults
from pypto_serving.operator.handlers import build_registry
from pypto_serving.operator.leader import LeaderElector, identity
from pypto_serving.operator.metrics import HealthServer, Metrics
from pypto_serving.operator.reconciler import Reconciler
from pypto_serving.operator.security import DEFAULT_ALLOWED_CAPABILITIES, DEFAULT_ALLOWED_HOST_PATHS
from pypto_serving.operator.validation import check_defaults

log = logging.getLogger("pypto_serving.operator")
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_host() -> str:
    """Never all interfaces by default: in a pod its IP ($POD_IP from the downward API), elsewhere loopback."""
    return os.environ.get("POD_IP") or "127.0.0.1"


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="pypto-serving operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--health-host", default=default_host(),
                   help="address of /healthz and /metrics (default: $POD_IP, else 127.0.0.1)")
    p.add_argument("--health-port", type=int, default=8081, help="port of /healthz and /metrics (0: disabled)")
    p.add_argument("--workers", type=int, default=4, help="concurrent reconciles (of different resources)")
    p.add_argument("--resync-seconds", type=float, default=30.0, help="periodic full resync interval")
    w = p.add_argument_group("admission webhook")
    w.add_argument("--webhook-mode", choices=["none", "url", "service"], default="none",
                   help="service (real clusters): serve the certificate the chart mounts in --webhook-cert-dir, "
                   "behind the chart's Service and configuration; url (the local cluster only): make a "
                   "certificate and register https://HOST:PORT in the configuration")
    w.add_argument("--webhook-listen", default=default_host(),
                   help="address the webhook server binds (default: $POD_IP, else 127.0.0.1)")
    w.add_argument("--webhook-port", type=int, default=9443, help="webhook server port (TLS)")
    w.add_argument("--webhook-host", default=None,
                   help="url mode: host the apiserver dials (default: $POD_IP, else 127.0.0.1)")
    w.add_argument("--webhook-config-name", default=MANAGER,
                   help="url mode: name of the ValidatingWebhookConfiguration to register in")
    w.add_argument("--webhook-failure-policy", choices=["Fail", "Ignore"], default="Fail", help="url mode")
    w.add_argument("--webhook-cert-dir", default=None,
                   help="service mode: ca.crt, tls.crt and tls.key (the chart's Secret, mounted); url mode: where "
                   "to write the generated ones (default: a temporary directory)")
    le = p.add_argument_group("leader election")
    le.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                    help="hold a Lease before reconciling, so several replicas are safe")
    le.add_argument("--leader-election-namespace", default=None, help="Lease namespace (default: own namespace)")
    le.add_argument("--leader-election-id", default=MANAGER, help="Lease name")
    le.add_argument("--lease-duration", type=int, default=15, help="seconds before a dead leader is replaced")
    le.add_argument("--lease-retry", type=float, default=2.0, help="seconds between renewals / attempts")
    dg = p.add_argument_group("defaults for PyptoServing resources",
                              "used for the fields a resource's spec leaves unset (the CRD does not default them)")
    dg.add_argument("--default-engine-image", default=t.DEFAULT_ENGINE_IMAGE, metavar="IMAGE",
                    help="spec.engine.image (default: %(default)s)")
    dg.add_argument("--default-gateway-image", default=None, metavar="IMAGE",
                    help="spec.gateway.image (default: the resource's engine image)")
    dg.add_argument("--default-device-resource", default=t.DEFAULT_DEVICE_RESOURCE, metavar="NAME",
                    help="spec.devices.resourceName, the device-plugin resource (default: %(default)s)")
    dg.add_argument("--default-devices-per-node", type=int, default=None, metavar="N",
                    help="spec.devices.perNode, rejects TP x PP above it (default: no check)")
    dg.add_argument("--default-routing", choices=t.ROUTING_POLICIES, default=t.DEFAULT_ROUTING,
                    help="spec.gateway.routing (default: %(default)s)")
    dg.add_argument("--default-gateway-service-type", choices=t.SERVICE_TYPES, default=t.DEFAULT_SERVICE_TYPE,
                    help="spec.gateway.serviceType (default: %(default)s)")
    dg.add_argument("--default-engine-cpu-request", default=DEFAULT_ENGINE_CPU_REQUEST, metavar="QUANTITY",
                    type=_optional, help="the engine's requests.cpu when spec.engine.resources names no cpu "
                    "(default: none)")
    dg.add_argument("--default-engine-cpu-limit", default=DEFAULT_ENGINE_CPU_LIMIT, metavar="QUANTITY",
                    type=_optional, help="the engine's limits.cpu when spec.engine.resources names no cpu "
                    "(default: none; the chart sets one)")
    sec = p.add_argument_group("security policy", "what a PyptoServing may ask of the nodes (operator/security.py); "
                               "a resource cannot widen it")
    sec.add_argument("--allowed-host-paths", type=_csv, default=DEFAULT_ALLOWED_HOST_PATHS, metavar="PREFIXES",
                     help="comma-separated host path prefixes that spec.model.volume.hostPath and "
                     f"spec.devices.hccnConfPath may use (default: {','.join(DEFAULT_ALLOWED_HOST_PATHS)})")
    sec.add_argument("--allowed-capabilities", type=_csv, default=DEFAULT_ALLOWED_CAPABILITIES, metavar="CAPS",
                     help="comma-separated capabilities spec.engine.securityContext may add back (default: none)")
    sec.add_argument("--allow-root-engines", action=argparse.BooleanOptionalAction, default=False,
                     help="let a resource run its engine as root (runAsUser 0, runAsNonRoot false)")
    p.add_argument("--control-key-file", default=None, metavar="FILE",
                   help="secret key (>= 32 bytes) the engines' control tokens are derived from; every operator "
                   "replica needs the same one (the chart mounts its Secret). Unset: a random key per process")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def operator_defaults(args: argparse.Namespace) -> OperatorDefaults:
    """The ``--default-*`` flags as the defaults `defaults.resolve` applies."""
    return OperatorDefaults(engine_image=args.default_engine_image, gateway_image=args.default_gateway_image,
                            device_resource_name=args.default_device_resource,
                            devices_per_node=args.default_devices_per_node, routing=args.default_routing,
                            gateway_service_type=args.default_gateway_service_type,
                            engine_cpu_request=args.default_engine_cpu_request,
                            engine_cpu_limit=args.default_engine_cpu_limit,
                            allowed_host_paths=tuple(args.allowed_host_paths),
                            allowed_capabilities=tuple(args.allowed_capabilities),
                            allow_root_engines=args.allow_root_engines)


def _csv(value: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _optional(value: str) -> str | None:
    """'' (or 'none') -> None."""
    return None if value.strip().lower() in ("", "none") else value.strip()


def own_namespace(args: argparse.Namespace) -> str:
    """The operator's namespace: $POD_NAMESPACE, the service account's, the first watched one, or default."""
    if os.environ.get(ENV_POD_NAMESPACE):
        return os.environ[ENV_POD_NAMESPACE]
    if SA_NAMESPACE_FILE.exists():
        return SA_NAMESPACE_FILE.read_text().strip()
    return args.namespace[0] if args.namespace else "default"


def webhook_tls(args: argparse.Namespace) -> tuple[wh.TLSBundle, Path, str | None]:
    """The certificate to serve, the directory holding its files, and (url mode) the host to register."""
    if args.webhook_mode == "service":
        if not args.webhook_cert_dir:
            raise SystemExit("--webhook-mode service needs --webhook-cert-dir: the chart's webhook Secret, mounted")
        cert_dir = Path(args.webhook_cert_dir)
        try:
            bundle = wh.load(cert_dir)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if not wh.covers(bundle, []):
            log.warning("the webhook certificate in %s expires within %d days: `helm upgrade` with a new one",
                        cert_dir, wh.RENEW_BEFORE_DAYS)
        return bundle, cert_dir, None
    host = args.webhook_host or os.environ.get(ENV_POD_IP) or "127.0.0.1"
    bundle = wh.generate([host, "localhost", "127.0.0.1"])
    cert_dir = Path(args.webhook_cert_dir or tempfile.mkdtemp(prefix="pypto-webhook-"))
    bundle.write(cert_dir)
    return bundle, cert_dir, host


async def run(args: argparse.Namespace) -> int:
    """Build everything and run kopf until a signal stops it."""
    namespace = own_namespace(args)
    defaults = operator_defaults(args)
    try:
        control_key = load_key(args.control_key_file)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    config = load_config(args.kubeconfig, args.context)
    kube = Kube(config)
    metrics = Metrics()
    actuator = Actuator(kube)
    elector = None
    controller: Controller
    if args.leader_elect:
        elector = LeaderElector(kube, args.leader_election_namespace or namespace, args.leader_election_id,
                                identity(), lease_duration=args.lease_duration, retry_period=args.lease_retry,
                                on_change=lambda leading: controller.on_leadership(leading))
    reconciler = Reconciler(actuator, metrics, defaults=defaults, operator_namespace=namespace,
                            control_key=control_key)
    controller = Controller(reconciler, metrics,
                            ControllerConfig(workers=args.workers, resync_seconds=args.resync_seconds), elector)
    health = HealthServer(metrics, controller.alive, args.health_host, args.health_port)

    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # the operator posts its own events
    settings.scanning.disabled = True  # least privilege: no CRD/namespace watching
    settings.watching.reconnect_backoff = 1.0
    webhook_config: dict[str, object] | None = None
    if args.webhook_mode != "none":
        bundle, cert_dir, url_host = webhook_tls(args)
        settings.admission.server = kopf.WebhookServer(
            addr=args.webhook_listen, port=args.webhook_port, host=url_host, certfile=str(cert_dir / "tls.crt"),
            pkeyfile=str(cert_dir / "tls.key"), cafile=str(cert_dir / "ca.crt"))
        settings.admission.managed = None  # never kopf's: the chart's (service mode) or registered below (url)
        if url_host is not None:
            webhook_config = wh.configuration(args.webhook_config_name, wh.client_config(
                bundle.ca, url_host, args.webhook_port), args.webhook_failure_policy)

    async def serve_webhook() -> None:
        """Once the webhook server listens: register it (url mode) or say it serves the chart's (service)."""
        await wait_listening("127.0.0.1" if args.webhook_listen in ("0.0.0.0", "") else args.webhook_listen,
                             args.webhook_port)
        if webhook_config is None:
            log.info("serving the validating webhook with the certificate in %s (service mode: the chart registers "
                     "it)", args.webhook_cert_dir)
            return
        await asyncio.to_thread(wh.register, kube, webhook_config)
        log.info("registered the validating webhook %s (%s mode)", args.webhook_config_name, args.webhook_mode)

    background: list[asyncio.Task[None]] = []

    async def on_startup() -> None:
        if args.health_port:
            await health.start()
        controller.start()
        if args.webhook_mode != "none":
            background.append(asyncio.create_task(serve_webhook(), name="pypto-webhook-registration"))

    async def on_cleanup() -> None:
        for task in background:
            task.cancel()
        await controller.stop()
        if webhook_config is not None:
            await asyncio.to_thread(wh.unregister, kube, args.webhook_config_name, webhook_config["webhooks"][0]
                                    ["clientConfig"])  # type: ignore[index]
        await health.stop()

    registry = build_registry(controller, config, on_startup, on_cleanup, webhook=args.webhook_mode != "none",
                              defaults=defaults)
    log.info("starting: %s, leader election %s, webhook %s, defaults %s", "all namespaces" if args.all_namespaces
             else f"namespaces {args.namespace}", "on" if elector else "off", args.webhook_mode, defaults)
    try:
        await kopf.operator(registry=registry, settings=settings, standalone=True,
                            clusterwide=args.all_namespaces, namespaces=args.namespace)
    finally:
        actuator.close()
        kube.close()
    return 0


async def wait_listening(host: str, port: int, timeout: float = 60.0) -> None:
    """Return once ``host:port`` accepts TCP connections."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the webhook server did not listen on {host}:{port}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pypto-serving operator`."""
    args = parser().parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        parser().error("one of --namespace NS or --all-namespaces is required")
    problems = check_defaults(operator_defaults(args))
    if problems:
        parser().error("; ".join(str(p) for p in problems))
    kopf.configure(verbose=args.log_level == "DEBUG", log_format=kopf.LogFormat.FULL)
    logging.getLogger().setLevel(args.log_level)
    logging.getLogger("kopf").setLevel(logging.DEBUG if args.log_level == "DEBUG" else logging.WARNING)
    for noisy in ("httpx", "httpx2", "httpcore2"):  # a line per API request (lightkube) otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
