"""`just deploy-check`: renders every kustomize overlay under deploy/k8s/overlays with
`kubectl kustomize`, validates every object against the Kubernetes schemas (kubernetes-validate,
offline, strict), and checks that the pieces agree with each other and with the server:

- every probe is a native gRPC probe on the gRPC container port; liveness asks the empty service,
  readiness and start-up ask modelloader.v1.ModelLoader;
- the container ports are the ports of MODEL_LOADER_LISTEN and MODEL_LOADER_METRICS_LISTEN in the
  ConfigMap the container reads, and the Service targets them;
- every MODEL_LOADER_* key of the ConfigMap is a flag of the server (its --help lists the variable);
- terminationGracePeriodSeconds is above MODEL_LOADER_SHUTDOWN_GRACE;
- the attach socket (MODEL_LOADER_ATTACH_SOCKET) lies on an emptyDir the server mounts, and every
  other container of the pod (a consumer) mounts that same volume at the same path;
- the auth token file (MODEL_LOADER_AUTH_TOKEN_FILE) lies on a Secret volume the server mounts
  read-only, and a NetworkPolicy selects the pod and admits only the gRPC and metrics ports;
- object-store credentials come from a Secret the overlay renders (envFrom), shipped without values;
- every container runs as non-root with a read-only root filesystem, no privilege escalation and
  every capability dropped;
- the gpu overlay asks for one nvidia.com/gpu and loads to cuda.

Usage: python3 deploy/check.py [--k8s DIR] [--server PATH-TO-model-loader]
"""

import argparse
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"
READY_SERVICE = "modelloader.v1.ModelLoader"


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def port_of(address):
    match = re.fullmatch(r".*:(\d+)", address or "")
    return int(match.group(1)) if match else None


def seconds_of(duration):
    match = re.fullmatch(r"(\d+)(ms|s|m)?", duration.strip())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2) or "s"
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def check_overlay(name, docs, server_env):
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "PersistentVolumeClaim",
                 "PodDisruptionBudget", "NetworkPolicy"]:
        if kind not in by_kind:
            errors.append(f"no {kind}")
    if errors:
        return errors

    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "model-loader")
    config_names = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
    configs = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] in config_names]
    if not configs:
        return [f"the container reads no ConfigMap of the overlay ({config_names})"]
    env = {}
    for config in configs:
        env.update(config.get("data", {}))

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    grpc_port, metrics_port = port_of(env.get("MODEL_LOADER_LISTEN")), port_of(env.get("MODEL_LOADER_METRICS_LISTEN"))
    if ports.get("grpc") != grpc_port:
        errors.append(f"container port grpc {ports.get('grpc')} is not MODEL_LOADER_LISTEN's port {grpc_port}")
    if ports.get("metrics") != metrics_port:
        errors.append(f"container port metrics {ports.get('metrics')} is not MODEL_LOADER_METRICS_LISTEN's port {metrics_port}")
    for probe, service in [("livenessProbe", ""), ("readinessProbe", READY_SERVICE), ("startupProbe", READY_SERVICE)]:
        spec = container.get(probe)
        if not spec or "grpc" not in spec:
            errors.append(f"{probe} is not a gRPC probe")
            continue
        if spec["grpc"].get("port") != grpc_port:
            errors.append(f"{probe} asks port {spec['grpc'].get('port')}, the server listens on {grpc_port}")
        if spec["grpc"].get("service", "") != service:
            errors.append(f"{probe} asks service {spec['grpc'].get('service')!r}, not {service!r}")
    for service in by_kind["Service"]:
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if target not in ports and target not in ports.values():
                errors.append(f"Service port {port['name']} targets {target}, not a container port {ports}")

    grace = seconds_of(env.get("MODEL_LOADER_SHUTDOWN_GRACE", "10s"))
    if grace is None or pod.get("terminationGracePeriodSeconds", 30) <= grace:
        errors.append(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} is not above the shutdown grace {grace}")
    for key in env:
        if key.startswith("MODEL_LOADER_") and server_env is not None and key not in server_env:
            errors.append(f"ConfigMap key {key} is no flag of the server")

    errors += check_attach(pod, container, env)
    errors += check_auth(pod, container, env, deployment, by_kind["NetworkPolicy"])
    errors += check_object_store(container, by_kind["Secret"])
    pod_security = pod.get("securityContext", {})
    for c in pod["containers"]:
        security = c.get("securityContext", {})
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            errors.append(f"container {c['name']} may run as root")
        if security.get("readOnlyRootFilesystem") is not True:
            errors.append(f"container {c['name']}: the root filesystem is writable")
        if security.get("allowPrivilegeEscalation") is not False:
            errors.append(f"container {c['name']}: privilege escalation is allowed")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            errors.append(f"container {c['name']}: capabilities are not all dropped")

    if name == "gpu":
        limits = container.get("resources", {}).get("limits", {})
        if str(limits.get("nvidia.com/gpu")) != "1":
            errors.append("the gpu overlay does not ask for one nvidia.com/gpu")
        if not env.get("MODEL_LOADER_DEVICE", "").startswith("cuda"):
            errors.append("the gpu overlay does not load to cuda")
    return errors


def check_attach(pod, server, env):
    """The attach socket's folder is an emptyDir the server mounts; every other container of the
    pod mounts the same volume at the same path, so it finds the socket."""
    socket = env.get("MODEL_LOADER_ATTACH_SOCKET")
    if not socket:
        return []
    folder = str(pathlib.PurePosixPath(socket).parent)
    mounts = {m["mountPath"]: m["name"] for m in server.get("volumeMounts", [])}
    volume = mounts.get(folder)
    if volume is None:
        return [f"the server mounts nothing at {folder}, the attach socket's folder"]
    kinds = {v["name"]: v for v in pod.get("volumes", [])}
    if "emptyDir" not in kinds.get(volume, {}):
        return [f"volume {volume} holding the attach socket is not an emptyDir"]
    errors = []
    for other in pod["containers"]:
        if other is server:
            continue
        theirs = {m["mountPath"]: m["name"] for m in other.get("volumeMounts", [])}
        if theirs.get(folder) != volume:
            errors.append(f"container {other['name']} does not mount volume {volume} at {folder}")
    return errors


def check_auth(pod, server, env, deployment, policies):
    """The token file is on a Secret volume mounted read-only; a NetworkPolicy selects the pod and
    lets in only its gRPC and metrics ports."""
    errors = []
    tokens = env.get("MODEL_LOADER_AUTH_TOKEN_FILE")
    if not tokens:
        errors.append("MODEL_LOADER_AUTH_TOKEN_FILE is not set: the gRPC service is open to anyone who reaches it")
    else:
        folder = str(pathlib.PurePosixPath(tokens).parent)
        mount = next((m for m in server.get("volumeMounts", []) if m["mountPath"] == folder), None)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if mount is None or "secret" not in volumes.get(mount["name"], {}):
            errors.append(f"the auth token file's folder {folder} is not a Secret volume the server mounts")
        elif not mount.get("readOnly"):
            errors.append(f"the Secret at {folder} is mounted writable")
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    selecting = [p for p in policies
                 if all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())]
    if not selecting:
        errors.append("no NetworkPolicy selects the pod")
    allowed = {"grpc", "metrics"} | {p["containerPort"] for p in server.get("ports", []) if p["name"] in ("grpc", "metrics")}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", [{"port": "any"}]):
                if port.get("port") not in allowed:
                    errors.append(f"NetworkPolicy {policy['metadata']['name']} admits port {port.get('port')}")
    return errors


def check_object_store(server, secrets):
    """Object-store credentials come from a Secret the overlay renders, which ships no values."""
    names = [s["secretRef"]["name"] for s in server.get("envFrom", []) if "secretRef" in s]
    rendered = {s["metadata"]["name"]: s for s in secrets}
    errors = [f"envFrom names the Secret {n}, which the overlay does not render" for n in names if n not in rendered]
    if not names:
        errors.append("no Secret gives the container its object-store credentials (envFrom secretRef)")
    for name in names:
        if rendered.get(name, {}).get("stringData") or rendered.get(name, {}).get("data"):
            errors.append(f"the Secret {name} ships credentials")
    return errors


def server_env_names(server):
    if server is None:
        return None
    out = subprocess.run([server, "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"env: (MODEL_LOADER_[A-Z_]+)", out.stdout))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k8s", default=str(pathlib.Path(__file__).parent / "k8s"))
    parser.add_argument("--server", help="the model-loader binary, to check the ConfigMap's flags")
    args = parser.parse_args()
    server_env = server_env_names(args.server)
    overlays = sorted(p for p in (pathlib.Path(args.k8s) / "overlays").iterdir() if p.is_dir())
    failed = False
    for overlay in overlays:
        docs = render(overlay)
        errors = check_overlay(overlay.name, docs, server_env)
        for error in errors:
            print(f"{overlay.name}: {error}", file=sys.stderr)
        failed |= bool(errors)
        if not errors:
            print(f"{overlay.name}: {len(docs)} objects valid for Kubernetes {KUBERNETES_VERSION}, probes, ports and flags agree")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
